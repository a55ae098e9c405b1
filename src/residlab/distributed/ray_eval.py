"""Evaluation spread over a Ray :class:`~residlab.distributed.ray_pool.ActorPool`.

The driver alone writes the condition's append-only :class:`~residlab.core.records.JsonlStore`
(the file a single-process run writes, so the two resume each other, and the workers need no shared
file system). Batches are planned exactly as :func:`~residlab.evaluation.runner.evaluate` plans them
(same composition, same seeds), so the records, and the report built from them, equal a
single-process run's. A batch whose actor died runs again elsewhere; the store's unique key keeps
any record from being stored twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from residlab.core.errors import ResidlabError
from residlab.core.records import JsonlStore
from residlab.data import Problem
from residlab.distributed.ray_pool import ActorPool
from residlab.engines import Engine
from residlab.evaluation.records import EvalRecord, record_key
from residlab.evaluation.runner import Condition, Decoding, batch_seed, matching_records, plan_batches, records_file
from residlab.models.lm import LanguageModel

BatchCallback = Callable[[ActorPool, int], None]


class RayEvaluator:
    """An :class:`~residlab.evaluation.runner.Evaluator` on a pool: pass it as ``evaluator=`` to
    ``run_compress`` / ``run_sweep``, or call it like ``evaluate``. ``on_batch`` is called after each
    stored batch with the number stored so far in this call."""

    def __init__(self, pool: ActorPool, *, on_batch: BatchCallback | None = None, progress: bool = True) -> None:
        self.pool = pool
        self.on_batch = on_batch
        self.progress = progress

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
        name, identity = self.pool.identity
        store = JsonlStore(records_file(Path(out_dir), condition, decoding, name, identity), unique_key=record_key)
        done = matching_records(store, problems)
        todo = [p for p in problems if p.id not in done]
        batches = plan_batches(todo, decoding)
        shared = self.pool.ray.put(condition)  # the vector travels once, not with every batch
        tasks = (("run_batch", (batch, shared, decoding, batch_seed(decoding, batch))) for batch in batches)
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"{condition.name} (ray)",
                   unit="problem", file=sys.stderr, disable=not self.progress or not todo)  # fmt: skip
        for count, (number, records) in enumerate(self.pool.run(tasks, ahead=len(batches)), start=1):
            stored = store.append(records)
            done.update((r["id"], EvalRecord.from_json(r)) for r in stored)
            bar.update(len(batches[number]))
            if self.on_batch is not None:
                self.on_batch(self.pool, count)
        bar.close()
        missing = [p.id for p in problems if p.id not in done]
        if missing:  # cannot happen unless a batch was lost without an error
            raise ResidlabError(f"{len(missing)} problems got no record.", hint="rerun: stored records are reused.")
        return [done[p.id] for p in problems]
