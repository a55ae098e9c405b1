"""A pool of Ray actors, one engine each (per GPU, or per CPU slice), that runs tasks and survives
actors dying: what ``ray_eval`` (evaluation) and ``ray_harvest`` (SAE activations) build on.

A task is a call of one :class:`EngineActor` method. Results come back as actors finish; a task
whose actor died (its process killed, its node lost) is handed to the next free actor, and the dead
actor is asked until Ray has restarted it (it then takes tasks again) or given it up. The callers
keep everything durable on the driver (records, shards), so a lost task loses nothing but time.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.data import Problem
from residlab.engines import EngineSpec
from residlab.evaluation.runner import Condition, Decoding, run_batch
from residlab.saes.activations import HarvestSpec, Rows, chunk_rows


def import_ray() -> Any:
    """The ``ray`` module, or a clear error (it is in the ``ray`` extra, which ``make install`` installs)."""
    try:
        import ray
    except ImportError:
        raise ResidlabError(
            "--ray needs the ray package, which is not installed.",
            hint="pip install 'residlab[ray]' (or make install).",
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
    brings back an actor that died; ``max_failures``: lost tasks tolerated before giving up.
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
    """The body of one Ray actor: an engine opened from a spec, running evaluation batches and
    harvest chunks."""

    def __init__(self, spec: EngineSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # the actor's CPU share, not the whole node
        self.engine = spec.open()

    def facts(self) -> tuple[str, str, int]:
        """(model name, engine identity, process id): what names the records, and whom to kill in tests."""
        return self.engine.name, self.engine.identity, os.getpid()

    def run_batch(self, problems: list[Problem], condition: Condition, decoding: Decoding, seed: int) -> list[dict]:
        """Generate and grade one planned batch; the records as JSON (the driver stores them)."""
        return [r.to_json() for r in run_batch(self.engine, problems, condition, decoding, seed=seed)]

    def harvest_rows(self, windows: dict[int, list[int]], chunk: list[int], spec: HarvestSpec) -> Rows:
        """One harvest chunk's rows (the torch engine's model: llama.cpp exposes no activations)."""
        lm = getattr(self.engine, "lm", None)
        if lm is None:
            raise ResidlabError("harvesting activations needs the torch engine.", hint="pass --engine torch.")
        return chunk_rows(lm, windows, chunk, spec)


Task = tuple[str, tuple[Any, ...]]  # (EngineActor method, arguments)


class ActorPool:
    """``count`` actors of :class:`EngineActor` on a Ray cluster; a context manager (actors start on
    entry and are killed on exit; a Ray instance the pool started is stopped)."""

    def __init__(self, spec: EngineSpec, options: RayOptions = RayOptions()) -> None:
        self.spec = spec
        self.options = options
        self.ray: Any = None
        self._started_ray = False
        self._actors: list[Any] = []
        self.facts: list[tuple[str, str, int]] = []
        self.lost_tasks = 0  # tasks run again because their actor died

    def start(self) -> None:
        """Connect to (or start) Ray and open one engine per actor; the engines must agree on their identity."""
        if self._actors:
            return
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            address = None if self.options.address == "local" else self.options.address
            try:
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
            except ConnectionError as err:
                raise ResidlabError(
                    f"cannot reach the Ray cluster at {self.options.address!r} ({err}).",
                    hint="start it with `ray start --head` (workers: `ray start --address HEAD:6379`), "
                    "or use --ray local.",
                ) from None
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = self._gpus_per_actor(resources)
        actor_class = ray.remote(EngineActor).options(
            num_cpus=self.options.cpus_per_actor,
            num_gpus=gpus,
            max_restarts=self.options.max_restarts,
            max_task_retries=0,  # a lost task is handed out again here, next to what it feeds
        )
        threads = int(self.options.cpus_per_actor)
        self._actors = [actor_class.remote(self.spec, threads) for _ in range(self._actor_count(resources, gpus))]
        try:
            self.facts = list(ray.get([actor.facts.remote() for actor in self._actors]))
        except ray.exceptions.RayTaskError as err:
            raise unwrapped(err) from None
        identities = {facts[:2] for facts in self.facts}
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

    @property
    def size(self) -> int:
        return len(self._actors)

    @property
    def actor_pids(self) -> list[int]:
        """Each actor's process id (updated when Ray restarts one)."""
        return [facts[2] for facts in self.facts]

    @property
    def identity(self) -> tuple[str, str]:
        """(model name, engine identity) of the actors' engines."""
        self.start()
        return self.facts[0][0], self.facts[0][1]

    def close(self) -> None:
        """Kill the actors (and stop the Ray instance this pool started)."""
        if self.ray is None:
            return
        for actor in self._actors:
            self.ray.kill(actor)
        self._actors, self.facts = [], []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> ActorPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, tasks: Iterable[Task], *, ahead: int | None = None) -> Iterator[tuple[int, Any]]:
        """(task number, result) as actors finish the tasks; at most ``ahead`` tasks are taken from
        ``tasks`` before their results are consumed (default: one per actor). A task whose actor died
        runs again on the next free actor."""
        self.start()
        ray = self.ray
        source = enumerate(tasks)
        taken: dict[int, Task] = {}
        retry: deque[int] = deque()
        idle = deque(range(len(self._actors)))
        strikes = [0] * len(self._actors)
        in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (actor, task number, or _PING)
        limit = max(ahead or len(self._actors), 1)
        exhausted = False
        while True:
            while idle and (retry or (not exhausted and len(taken) < limit)):
                if retry:
                    number = retry.popleft()
                else:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    number, taken[item[0]] = item
                actor = idle.popleft()
                method, args = taken[number]
                in_flight[getattr(self._actors[actor], method).remote(*args)] = (actor, number)
            if not in_flight:
                if exhausted and not retry:
                    return
                raise ResidlabError("every Ray actor has died.", hint="check the workers' logs; rerun to resume.")
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                actor, number = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise unwrapped(err) from None
                except ray.exceptions.RayActorError as err:
                    if number != _PING:
                        self._lose(number, retry)
                    # unavailable: Ray is restarting it (ask again, a little later); died: count it
                    if isinstance(err, ray.exceptions.ActorUnavailableError):
                        time.sleep(0.2)
                    else:
                        strikes[actor] += 1
                    if strikes[actor] <= self.options.max_restarts + 1:
                        in_flight[self._actors[actor].facts.remote()] = (actor, _PING)
                    continue
                if number == _PING:
                    self.facts[actor], strikes[actor] = result, 0  # restarted: a new process
                    idle.append(actor)
                    continue
                idle.append(actor)
                del taken[number]
                yield number, result

    def _lose(self, number: int, retry: deque[int]) -> None:
        self.lost_tasks += 1
        if self.lost_tasks > self.options.max_failures:
            raise ResidlabError(
                f"{self.lost_tasks} tasks were lost to dying Ray actors.",
                hint="check the workers' memory and logs; rerun to resume from what was stored.",
            )
        retry.append(number)


_PING = -1  # an in-flight call that only asks whether a dead actor is back


def unwrapped(err: Any) -> BaseException:
    """The error an actor raised (a ResidlabError keeps its message and hint), not Ray's wrapper."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
