"""One evaluation record: the graded generation for one problem under one condition.

Records are stored one JSON object per line (append-only, see ``core.records.JsonlStore``). The
field order of :class:`EvalRecord` is the key order on disk, so ``to_json`` writes byte for byte
what earlier versions wrote and every existing record file is read and reused as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.data import Problem


@dataclass(frozen=True)
class EvalRecord:
    """A generated answer, its cost and its grade."""

    id: str  # the problem's id
    condition: str  # the condition's name
    output: str  # the generated text
    tokens: int  # generated tokens
    hit_limit: bool  # stopped by the token budget, not by the model
    seconds: float  # this problem's share of its batch's time
    batch_seconds: float
    batch_size: int
    extracted: str | None  # the answer found in the output (None: none)
    rule: str  # the extraction rule that found it
    gold: str
    correct: bool
    time: float  # when it was written (Unix seconds)
    # What the problem was when this was generated (question and gold answer): a record is reused only
    # for the same content. Records written before it existed lack it and are matched by gold answer.
    problem_sha: str | None = None

    @property
    def solved(self) -> bool:
        """Correct and finished: an answer the trace reached before the token budget ran out."""
        return self.correct and not self.hit_limit

    def to_json(self) -> dict[str, Any]:
        """The record as stored: the fields in declaration order (the on-disk key order)."""
        data = {name: getattr(self, name) for name in FIELDS}
        if data["problem_sha"] is None:
            del data["problem_sha"]
        return data

    def matches(self, problem: Problem) -> bool:
        """Whether this record was generated for ``problem`` as it is now (same question and answer)."""
        if self.id != problem.id:
            return False
        if self.problem_sha is not None:
            return self.problem_sha == problem_fingerprint(problem)
        return self.gold == problem.answer

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalRecord:
        """A stored record; keys beyond the record's fields are ignored, a missing one is an error."""
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise ResidlabError(
                f"an evaluation record lacks the field(s) {missing} (it has {sorted(data)}).",
                hint="the records file was edited or written by something else; delete it and rerun.",
            )
        return cls(**{name: data[name] for name in FIELDS if name in data})


def problem_fingerprint(problem: Problem) -> str:
    """A short hash of what a record's correctness depends on: the question and the gold answer."""
    payload = json.dumps([problem.question, problem.answer], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def record_key(data: Mapping[str, Any]) -> tuple[Any, Any]:
    """The unique key of a stored record: its problem id and the problem content it was made for."""
    return data.get("id"), data.get("problem_sha")


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EvalRecord))
REQUIRED: tuple[str, ...] = tuple(f.name for f in fields(EvalRecord) if f.default is MISSING)
