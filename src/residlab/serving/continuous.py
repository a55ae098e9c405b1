"""Continuous batching on the torch engine: requests join the running batch at the next decode step and
leave it when they finish, each with its own sampling and its own steering.

Each turn of the loop (one thread owns the model): queued requests are prefilled together (left-
padded among themselves) and their first tokens picked; those still going join the running batch's
KV cache (:mod:`residlab.serving.kv_rows`); then the running batch takes one decode step, and rows that
hit an end-of-sequence token or their budget leave. Steering is per row
(:class:`~residlab.interventions.row_steer.RowSteering`, by the slot each request holds), so rows with
different vectors, strengths, layers and position rules share every forward pass. Greedy rows give the
tokens the same request gives run alone (real positions and masks make padding invisible; the tests
and the load benchmark check it).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from residlab.core.generation import pick_next_tokens
from residlab.engines.torch_engine import TorchEngine
from residlab.interventions.row_steer import RowSteering
from residlab.serving import kv_rows
from residlab.serving.jobs import Job, Scheduler
from residlab.serving.metrics import ServerMetrics


@dataclass
class _Row:
    """A request in the running batch."""

    job: Job
    slot: int
    prompt_length: int
    next_position: int
    generator: torch.Generator | None
    last_token: int = 0
    generated: int = 0
    eos: frozenset[int] = field(default_factory=frozenset)


class ContinuousBatcher(Scheduler):
    """Runs :class:`Job` s on a :class:`TorchEngine` with continuous batching (see the module docstring)."""

    name = "continuous-batcher"

    def __init__(self, engine: TorchEngine, metrics: ServerMetrics, *, max_batch: int = 32, max_queue: int = 256):
        super().__init__(max_queue)
        self.lm = engine.lm
        self.metrics = metrics
        self.max_batch = max_batch
        self.steering = RowSteering(self.lm, max_batch)
        self._free = list(range(max_batch - 1, -1, -1))
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._eos = frozenset(self.lm.eos_token_ids)
        self._joinable: bool | None = (
            None  # whether the model's cache takes rows mid-decode (seen at the first prefill)
        )

    # -- the loop -------------------------------------------------------------------------------
    def _in_progress(self) -> list[Job]:
        jobs = [row.job for row in self._rows]
        for row in self._rows:
            self._release(row)
        self._rows, self._cache, self._mask = [], None, None
        return jobs

    def step(self) -> None:
        room = self.max_batch - len(self._rows)
        if self._rows and not self._joinable:
            room = 0  # this model's cache cannot take rows mid-decode: new requests wait for the batch to drain
        fresh = self._take(room, wait=not self._rows) if room else []
        # A cache that cannot join rows (or one not seen yet) takes its arrivals as one padded group.
        groups = prefill_groups(fresh) if self._joinable else [fresh] if fresh else []
        for group in groups:
            self._guarded(lambda group=group: self._admit(group), group)
        if self._rows:
            rows = list(self._rows)
            self._guarded(self._decode, [row.job for row in rows], reset=True)

    def _guarded(self, work: Any, jobs: list[Job], *, reset: bool = False) -> None:
        """Run ``work``; if it fails, fail ``jobs`` (not the server) and, with ``reset``, drop the running
        batch (its cache may be half updated). A failed admission has released its own slots."""
        try:
            work()
        except Exception as err:  # noqa: BLE001 - one batch's failure must not stop the loop
            traceback.print_exc(file=sys.stderr)
            for job in jobs:
                job.fail(err)
            if reset:
                for row in self._rows:
                    self._release(row)
                self._rows, self._cache, self._mask = [], None, None

    # -- joining --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _admit(self, jobs: list[Job]) -> None:
        lm = self.lm
        rows: list[_Row] = []
        try:
            for job in jobs:
                rows.append(self._new_row(job))
            batch = lm.pad([job.token_ids for job in jobs])
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = self._forward(rows, batch.input_ids, batch.attention_mask, positions, cache=None)
        except BaseException:
            for row in rows:
                self._release(row)
            raise
        cache, mask = _returned_cache(out), batch.attention_mask
        if self._joinable is None:
            self._joinable = kv_rows.joinable(cache)
        keep = self._advance(rows, out.logits[:, -1, :])
        if not keep:
            return
        if len(keep) < len(rows):
            mask = kv_rows.keep_rows(cache, mask, torch.tensor(keep, dtype=torch.long, device=mask.device))
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
        else:
            self._mask = kv_rows.join(self._cache, self._mask, cache, mask)
        self._rows.extend(rows[i] for i in keep)

    def _new_row(self, job: Job) -> _Row:
        slot = self._free.pop()
        steering = job.steering
        if steering is not None:
            try:
                self.steering.set_row(slot, steering.deltas(), steering.rule)
            except BaseException:
                self._free.append(slot)
                raise
        length = len(job.token_ids)
        eos = frozenset() if job.sampling.ignore_eos else self._eos
        return _Row(job, slot, length, length, job.sampling.generator(), eos=eos)

    def _release(self, row: _Row) -> None:
        self.steering.clear_row(row.slot)
        self._free.append(row.slot)

    # -- stepping -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode(self) -> None:
        rows, lm = self._rows, self.lm
        assert self._mask is not None
        device = lm.device
        ids = torch.tensor([[row.last_token] for row in rows], device=device)
        positions = torch.tensor([[row.next_position] for row in rows], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self._forward(rows, ids, mask, positions, cache=self._cache)
        self._cache, self._mask = _returned_cache(out), mask
        keep = self._advance(rows, out.logits[:, -1, :])
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
        elif len(keep) < len(rows):
            self._mask = kv_rows.keep_rows(self._cache, mask, torch.tensor(keep, dtype=torch.long, device=device))
            self._rows = [rows[i] for i in keep]

    def _forward(self, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any):
        lm = self.lm
        slots = [row.slot for row in rows]
        tracker = lm.tracker
        tracker.row_index = torch.tensor(slots, device=lm.device)
        tracker.prompt_lengths = torch.tensor([row.prompt_length for row in rows], device=lm.device)
        try:
            with self.steering.applied(slots):
                return lm._call(ids, mask, positions, cache, last_only=True)
        finally:
            tracker.row_index = tracker.prompt_lengths = None
            self.metrics.record_step(len(rows), int(ids.shape[0] * ids.shape[1]))

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, hand it to its job; return the indices of the rows still going."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        keep: list[int] = []
        for i, row in enumerate(rows):
            sampling = row.job.sampling
            token = greedy[i] if sampling.greedy else int(pick_next_tokens(logits[i : i + 1], sampling, row.generator))
            row.generated += 1
            row.last_token = token
            row.next_position += 0 if row.generated == 1 else 1
            row.job.emit([token])
            hit_eos = token in row.eos
            if hit_eos or row.generated >= sampling.max_new_tokens or row.job.cancelled.is_set():
                row.job.finish(hit_limit=not hit_eos)
                self.metrics.record_tokens(row.generated)
                self._release(row)
            else:
                keep.append(i)
        return keep


def prefill_groups(jobs: list[Job], max_padding: float = 0.15) -> list[list[Job]]:
    """``jobs`` sorted by prompt length and cut into groups that are prefilled together, each padding
    at most ``max_padding`` of its tokens: a prefill is compute-bound, so padding is pure waste."""
    groups: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: len(j.token_ids)):
        group = groups[-1] if groups else None
        if group is not None:
            real = sum(len(j.token_ids) for j in group) + len(job.token_ids)
            if len(job.token_ids) * (len(group) + 1) <= (1 + max_padding) * real:
                group.append(job)
                continue
        groups.append([job])
    return groups


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
