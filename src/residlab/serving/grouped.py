"""Batching for engines without per-row steering (llama.cpp): requests grouped by their steering.

llama.cpp's control vector is one per context, so a batch can only hold requests that steer alike. Each
turn takes the oldest waiting request and every queued request with the same steering (vector names,
strengths, layers, rule) and greedy decoding, and runs them as one ``engine.generate`` batch (a group
at a time: simple, and every request in a group shares its forward passes). The group runs to the
longest budget; shorter requests keep their own first tokens (greedy decoding does not depend on the
budget). A sampled request runs alone, so its seed gives what it gives alone.
"""

from __future__ import annotations

import sys
import traceback

from residlab.core.generation import PromptBatch, SamplingParams
from residlab.engines import Engine
from residlab.serving.jobs import Job, Scheduler
from residlab.serving.metrics import ServerMetrics


def group_key(job: Job) -> tuple:
    """Jobs with equal keys can share one ``generate`` call."""
    steering = None if job.steering is None else job.steering.key
    if not job.sampling.greedy:
        return ("alone", id(job))
    return steering, job.sampling.ignore_eos


class GroupedScheduler(Scheduler):
    """Runs :class:`Job` s on any :class:`Engine`, one group of identically steered requests at a time."""

    name = "grouped-scheduler"

    def __init__(self, engine: Engine, metrics: ServerMetrics, *, max_batch: int = 32, max_queue: int = 256):
        super().__init__(max_queue)
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self._waiting: list[Job] = []  # taken from the queue, not yet run (another group went first)

    def _in_progress(self) -> list[Job]:
        jobs, self._waiting = self._waiting, []
        return jobs

    def step(self) -> None:
        self._waiting.extend(self._take(self.max_batch, wait=not self._waiting))
        self._waiting = [job for job in self._waiting if not job.cancelled.is_set()]
        if not self._waiting:
            return
        key = group_key(self._waiting[0])
        group = [job for job in self._waiting if group_key(job) == key][: self.max_batch]
        self._waiting = [job for job in self._waiting if job not in group]
        try:
            self._generate(group)
        except Exception as err:  # noqa: BLE001 - one group's failure must not stop the loop
            traceback.print_exc(file=sys.stderr)
            for job in group:
                job.fail(err)

    def _generate(self, group: list[Job]) -> None:
        first = group[0]
        budget = max(job.sampling.max_new_tokens for job in group)
        sampling = SamplingParams(
            max_new_tokens=budget,
            temperature=first.sampling.temperature,
            top_p=first.sampling.top_p,
            seed=first.sampling.seed,
            ignore_eos=first.sampling.ignore_eos,
        )
        steering = None if first.steering is None else first.steering.spec()
        prompts = PromptBatch(tuple(range(len(group))), tuple(job.token_ids for job in group))
        # the engine's own batch decoder under the group's steering: the prompts are already token ids
        with self.engine._steered(steering) as decode:
            outputs, hit_limit = decode(prompts, sampling, sampling.generator())
        self.metrics.record_step(len(group), sum(len(p) for p in prompts.token_ids))
        for job, tokens, limited in zip(group, outputs, hit_limit, strict=True):
            own = tokens[: job.sampling.max_new_tokens]
            job.emit(own)
            job.finish(hit_limit=limited or len(own) < len(tokens))
            self.metrics.record_tokens(len(own))
