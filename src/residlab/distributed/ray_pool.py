"""Evaluation spread over a Ray cluster: one engine per actor (per GPU, or per CPU slice), the
problems' planned batches handed out as actors free up, every record stored by the driver.

The driver alone writes the condition's append-only :class:`~residlab.core.records.JsonlStore`
(the same file a single-process run writes, so runs resume each other and the file system need not
be shared with the workers). Batches are planned exactly as :func:`~residlab.evaluation.runner.evaluate`
plans them (same composition, same seeds), so the records, and the report built from them, equal a
single-process run's. An actor that dies mid-batch (its process killed, its node lost) loses only
that batch: it goes back into the queue for another actor (Ray restarts the dead one, up to
``max_restarts`` times), and the store's unique key keeps any record from being stored twice.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from residlab.core.errors import ResidlabError
from residlab.core.records import JsonlStore
from residlab.data import Problem
from residlab.engines import Engine, EngineSpec
from residlab.evaluation.records import EvalRecord, record_key
from residlab.evaluation.runner import (
    Condition,
    Decoding,
    batch_seed,
    matching_records,
    plan_batches,
    records_file,
    run_batch,
)
from residlab.models.lm import LanguageModel


def import_ray() -> Any:
    """The ``ray`` module, or a clear error (it is in the ``ray`` extra, which ``make install`` installs)."""
    try:
        import ray
    except ImportError:
        raise ResidlabError(
            "--ray needs the ray package, which is not installed.", hint="pip install 'residlab[ray]' (or make install)."
        ) from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How to use the cluster.

    ``address``: ``local`` (start a Ray instance on this machine), ``auto`` (the cluster this node
    belongs to, started with ``ray start``), or a cluster address (``ray://head:10001``, ``head:6379``).
    ``actors``: how many engines (default: one per GPU when the engine runs on GPUs, else one per
    ``cpus_per_actor`` CPUs of the cluster). ``gpus_per_actor``: default 1 when the engine asks for a
    GPU (``--device cuda``/``auto`` on a cluster with GPUs), else 0. ``max_restarts``: how often Ray
    brings back an actor that died; ``max_failures``: lost batches tolerated before giving up.
    """

    address: str = "local"
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    max_restarts: int = 2
    max_failures: int = 8

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ResidlabError(f"--ray-actors must be 1 or more, got {self.actors}.", hint="pass --ray-actors 2.")
        if self.cpus_per_actor <= 0:
            raise ResidlabError("cpus per actor must be positive.", hint="pass a value such as 1 or 4.")


class EngineActor:
    """The body of one Ray actor: an engine opened from a spec, running planned batches."""

    def __init__(self, spec: EngineSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # the actor's CPU share, not the whole node
        self.engine = spec.open()

    def facts(self) -> tuple[str, str, int]:
        """(model name, engine identity, process id): what names the records file, and whom to kill in tests."""
        return self.engine.name, self.engine.identity, os.getpid()

    def run(self, problems: list[Problem], condition: Condition, decoding: Decoding, seed: int) -> list[dict]:
        """Generate and grade one planned batch; the records as JSON (the driver stores them)."""
        return [r.to_json() for r in run_batch(self.engine, problems, condition, decoding, seed=seed)]


BatchCallback = Callable[["RayEvaluator", int], None]


class RayEvaluator:
    """An :class:`~residlab.evaluation.runner.Evaluator` that runs on a Ray cluster.

    Use it as a context manager (actors are started on entry and killed on exit), and pass it as
    ``evaluator=`` to ``run_compress`` / ``run_sweep``, or call it like ``evaluate``. ``on_batch`` is
    called after each stored batch with the number of batches stored so far (progress display).
    """

    def __init__(
        self,
        spec: EngineSpec,
        options: RayOptions = RayOptions(),
        *,
        on_batch: BatchCallback | None = None,
        progress: bool = True,
    ) -> None:
        self.spec = spec
        self.options = options
        self.on_batch = on_batch
        self.progress = progress
        self._ray: Any = None
        self._started_ray = False
        self._actors: list[Any] = []
        self._facts: list[tuple[str, str, int]] = []
        self.lost_batches = 0  # batches requeued because their actor died

    # -- cluster ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to (or start) Ray and open one engine per actor; the engines must agree on their identity."""
        if self._actors:
            return
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            address = None if self.options.address == "local" else self.options.address
            try:
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
            except ConnectionError as err:
                raise ResidlabError(
                    f"cannot reach the Ray cluster at {self.options.address!r} ({err}).",
                    hint="start it with `ray start --head` (workers: `ray start --address HEAD:6379`), or use --ray local.",
                ) from None
            self._started_ray = True
        gpus = self._gpus_per_actor(ray.cluster_resources())
        count = self._actor_count(ray.cluster_resources(), gpus)
        actor_class = ray.remote(EngineActor).options(
            num_cpus=self.options.cpus_per_actor,
            num_gpus=gpus,
            max_restarts=self.options.max_restarts,
            max_task_retries=0,  # a lost batch is requeued here, where the store is
        )
        threads = int(self.options.cpus_per_actor)
        self._actors = [actor_class.remote(self.spec, threads) for _ in range(count)]
        self._facts = self._call_all("facts")
        identities = {facts[:2] for facts in self._facts}
        if len(identities) != 1:
            raise ResidlabError(
                f"the Ray actors opened different engines: {sorted(identities)}.",
                hint="give every node the same model files and hardware kind, or pin --device and --dtype.",
            )

    def _gpus_per_actor(self, resources: dict[str, float]) -> float:
        if self.options.gpus_per_actor is not None:
            return self.options.gpus_per_actor
        wants_gpu = self.spec.uses_gpu or (self.spec.device == "auto" and resources.get("GPU", 0) > 0)
        return 1.0 if wants_gpu else 0.0

    def _actor_count(self, resources: dict[str, float], gpus: float) -> int:
        if self.options.actors is not None:
            return self.options.actors
        if gpus > 0:
            return max(1, int(resources.get("GPU", 0) // gpus))
        return max(1, int(resources.get("CPU", 1) // self.options.cpus_per_actor))

    def _call_all(self, method: str) -> list[Any]:
        try:
            return list(self._ray.get([getattr(actor, method).remote() for actor in self._actors]))
        except self._ray.exceptions.RayTaskError as err:
            raise _unwrapped(err) from None

    @property
    def actor_pids(self) -> list[int]:
        """Each actor's process id (as first started)."""
        return [facts[2] for facts in self._facts]

    @property
    def identity(self) -> tuple[str, str]:
        """(model name, engine identity) of the actors' engines: what names the records file."""
        self.start()
        return self._facts[0][0], self._facts[0][1]

    def close(self) -> None:
        """Kill the actors (and stop the Ray instance this evaluator started)."""
        if self._ray is None:
            return
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._facts = [], []
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayEvaluator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- evaluation -------------------------------------------------------------------------
    def __call__(
        self,
        model: LanguageModel | Engine | None,
        problems: Sequence[Problem],
        condition: Condition,
        decoding: Decoding,
        out_dir: str | Path,
    ) -> list[EvalRecord]:
        """Like :func:`~residlab.evaluation.runner.evaluate`, on the cluster. ``model`` (a local engine,
        if the caller has one) is not used: the actors' engines produce and name the records."""
        name, identity = self.identity
        store = JsonlStore(records_file(Path(out_dir), condition, decoding, name, identity), unique_key=record_key)
        done = matching_records(store, problems)
        todo = [p for p in problems if p.id not in done]
        stored_batches = 0
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"{condition.name} (ray)",
                   unit="problem", file=sys.stderr, disable=not self.progress or not todo)  # fmt: skip
        for batch, records in self._run(plan_batches(todo, decoding), condition, decoding):
            stored = store.append(records)
            done.update((r["id"], EvalRecord.from_json(r)) for r in stored)
            stored_batches += 1
            bar.update(len(batch))
            if self.on_batch is not None:
                self.on_batch(self, stored_batches)
        bar.close()
        missing = [p.id for p in problems if p.id not in done]
        if missing:  # cannot happen unless a batch was lost without an error
            raise ResidlabError(f"{len(missing)} problems got no record.", hint="rerun: stored records are reused.")
        return [done[p.id] for p in problems]

    def _run(
        self, batches: list[list[Problem]], condition: Condition, decoding: Decoding
    ) -> Iterator[tuple[list[Problem], list[dict]]]:
        """(batch, its records) as actors finish them. A batch whose actor died is requeued, and the
        actor is pinged until Ray has restarted it (it then takes batches again) or given it up."""
        ray = self._ray
        queue = deque(range(len(batches)))
        idle = deque(range(len(self._actors)))
        strikes = [0] * len(self._actors)
        in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (actor, batch index, or _PING)
        shared = ray.put(condition)  # the vector travels once, not with every batch
        while queue or in_flight:
            while queue and idle:
                actor, index = idle.popleft(), queue.popleft()
                batch = batches[index]
                in_flight[self._actors[actor].run.remote(batch, shared, decoding, batch_seed(decoding, batch))] = (
                    actor,
                    index,
                )
            if not in_flight:
                raise ResidlabError("every Ray actor has died.", hint="check the workers' logs; rerun to resume.")
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                actor, index = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise _unwrapped(err) from None
                except ray.exceptions.RayActorError as err:
                    if index != _PING:
                        self._lose(index, queue)
                    # unavailable: Ray is restarting it (ask again, a little later); died: count it
                    if not isinstance(err, ray.exceptions.ActorUnavailableError):
                        strikes[actor] += 1
                    else:
                        time.sleep(0.2)
                    if strikes[actor] <= self.options.max_restarts + 1:
                        in_flight[self._actors[actor].facts.remote()] = (actor, _PING)
                    continue
                if index == _PING:
                    self._facts[actor] = result  # restarted: a new process
                    strikes[actor] = 0
                    idle.append(actor)
                    continue
                idle.append(actor)
                yield batches[index], result

    def _lose(self, index: int, queue: deque[int]) -> None:
        """Requeue a batch whose actor died (first, to keep the records' order close to the plan)."""
        self.lost_batches += 1
        if self.lost_batches > self.options.max_failures:
            raise ResidlabError(
                f"{self.lost_batches} batches were lost to dying Ray actors.",
                hint="check the workers' memory and logs; rerun to resume from the stored records.",
            )
        queue.appendleft(index)


_PING = -1  # an in-flight call that only asks whether a dead actor is back


def _unwrapped(err: Any) -> BaseException:
    """The error an actor raised (a ResidlabError keeps its message and hint), not Ray's wrapper."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
