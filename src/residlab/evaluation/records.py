"""One evaluation record: the graded generation for one problem under one condition.

Records are stored one JSON object per line (append-only, see ``core.records.JsonlStore``). The
field order of :class:`EvalRecord` is the key order on disk, so ``to_json`` writes byte for byte
what earlier versions wrote and every existing record file is read and reused as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from residlab.core.errors import ResidlabError


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

    @property
    def solved(self) -> bool:
        """Correct and finished: an answer the trace reached before the token budget ran out."""
        return self.correct and not self.hit_limit

    def to_json(self) -> dict[str, Any]:
        """The record as stored: the fields in declaration order (the on-disk key order)."""
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalRecord:
        """A stored record; keys beyond the record's fields are ignored, a missing one is an error."""
        missing = [name for name in FIELDS if name not in data]
        if missing:
            raise ResidlabError(
                f"an evaluation record lacks the field(s) {missing} (it has {sorted(data)}).",
                hint="the records file was edited or written by something else; delete it and rerun.",
            )
        return cls(**{name: data[name] for name in FIELDS})


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EvalRecord))
