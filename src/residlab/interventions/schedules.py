"""Adaptive steering strength: a per-row, per-token scale on the steering delta during generation.

A :class:`StrengthSchedule` is asked, after every generated token, for the scale of the steering at
that token's position (the delta added there is ``scale * strength * vector``); the prompt's steered
positions always get scale 1. The scale of a position depends only on what was generated up to and
including its token (and on the distribution that token was drawn from), never on later tokens, so a
decoder that feeds one token at a time against the KV cache and one that recomputes the whole
sequence every step apply exactly the same deltas (tested against each other).

Schedules (a registry, :data:`SCHEDULES`):

- ``until-answer``: 1 until the trace has written its final answer (a closed ``\\boxed{...}``),
  then 0 for good: the steering cannot disturb the answer's tokens or what follows;
- ``step-boundaries``: 1 only at tokens that end a line (the model's reasoning steps), else 0;
- ``entropy``: the next-token entropy ``H`` (nats) of the distribution the token was drawn from,
  as ``min(cap, H / reference)``: strong where the model hesitates, weak where it is sure;
- ``after-setup``: 0 until the trace writes its first ``=`` (its first computation), then 1 for good:
  the question is read and set up unsteered, only the derivation after it is steered;
- ``until-thought-ends``: for reasoning (R1-style) models, 1 while the model thinks, 0 for good once it
  closes its thinking (``</think>``): the thinking is what ASC compresses, the summary and answer after it
  are left as the model writes them (unlike ``until-answer``, a ``\\boxed{}`` written while thinking does
  not end it). A model that never writes the marker is steered throughout.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from residlab.core.errors import ResidlabError

ANSWER_MARKER = "\\boxed{"
THOUGHT_END_MARKER = "</think>"  # closes the thinking of DeepSeek-R1 distills, QwQ and Qwen3


@dataclass(frozen=True)
class ScheduleStep:
    """What a schedule sees after one generation step, for the rows still generating (in batch order)."""

    tokens: torch.Tensor  # [rows] the token just generated
    logits: torch.Tensor  # [rows, vocab] float32 logits it was drawn from
    previous: torch.Tensor  # [rows] float32 scale at the previous generated position (1 before the first)
    generated: Sequence[Sequence[int]]  # each row's generated ids so far, the new token included
    decode: Callable[[Sequence[int]], str]  # token ids -> text (the model's tokenizer)


class StrengthSchedule(ABC):
    """A rule for the steering scale at each generated position (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def scales(self, step: ScheduleStep) -> torch.Tensor:
        """[rows] float32 scale for the position of each row's newly generated token."""

    def describe(self) -> dict[str, Any]:
        """The schedule and its parameters (part of a condition's fingerprint)."""
        return {"schedule": self.name, **asdict(self)}  # type: ignore[call-overload]


def answer_written(text: str, marker: str = ANSWER_MARKER) -> bool:
    """Whether ``text`` holds ``marker`` (``\\boxed{``) followed by its balanced closing brace."""
    start = text.find(marker)
    while start >= 0:
        depth = 1
        for char in text[start + len(marker) :]:
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth == 0:
                return True
        start = text.find(marker, start + 1)
    return False


def _off_once_written(step: ScheduleStep, trigger: str, written: Callable[[str], bool]) -> torch.Tensor:
    """The previous scales, with each row still on turned off for good once ``written(trace)`` holds. The
    trace is decoded only when the new token holds ``trigger`` (the one character that can complete it)."""
    out = step.previous.clone()
    for row, ids in enumerate(step.generated):
        if out[row] != 0 and trigger in step.decode([int(step.tokens[row])]) and written(step.decode(ids)):
            out[row] = 0.0
    return out


@dataclass(frozen=True)
class UntilAnswer(StrengthSchedule):
    """Scale 1 until the final answer is written (``marker`` ... closing brace), then 0 for good."""

    name: ClassVar[str] = "until-answer"
    marker: str = ANSWER_MARKER

    def scales(self, step: ScheduleStep) -> torch.Tensor:
        # Only a token with a closing brace can complete the answer.
        return _off_once_written(step, "}", lambda text: answer_written(text, self.marker))


@dataclass(frozen=True)
class StepBoundaries(StrengthSchedule):
    """Scale 1 at tokens holding a newline (where a reasoning step ends and the next is chosen), else 0."""

    name: ClassVar[str] = "step-boundaries"

    def scales(self, step: ScheduleStep) -> torch.Tensor:
        return torch.tensor([1.0 if "\n" in step.decode([int(t)]) else 0.0 for t in step.tokens.tolist()])


@dataclass(frozen=True)
class EntropyScaled(StrengthSchedule):
    """Scale ``min(cap, H / reference)``, ``H`` the entropy (nats) of the distribution the token came from."""

    name: ClassVar[str] = "entropy"
    reference: float = 1.0
    cap: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.reference) and self.reference > 0 and math.isfinite(self.cap) and self.cap > 0):
            raise ResidlabError(
                f"the entropy schedule needs a positive reference and cap, got {self.reference} and {self.cap}.",
                hint="e.g. reference=1.0 (nats), cap=2.0.",
            )

    def scales(self, step: ScheduleStep) -> torch.Tensor:
        logp = torch.log_softmax(step.logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return (entropy / self.reference).clamp(0.0, self.cap).cpu()


@dataclass(frozen=True)
class AfterSetup(StrengthSchedule):
    """Scale 0 until a generated token holds ``marker`` (the first computation), then 1 for good."""

    name: ClassVar[str] = "after-setup"
    marker: str = "="

    def scales(self, step: ScheduleStep) -> torch.Tensor:
        out = torch.zeros(len(step.generated))
        for row, ids in enumerate(step.generated):
            # "previous" is 1 before the first token: it says "already on" only from the second token on.
            on_already = len(ids) > 1 and step.previous[row] != 0
            out[row] = 1.0 if on_already or self.marker in step.decode([int(step.tokens[row])]) else 0.0
        return out


@dataclass(frozen=True)
class UntilThoughtEnds(StrengthSchedule):
    """Scale 1 until the trace holds ``marker`` (the end of a reasoning model's thinking), then 0 for good."""

    name: ClassVar[str] = "until-thought-ends"
    marker: str = THOUGHT_END_MARKER

    def scales(self, step: ScheduleStep) -> torch.Tensor:
        # Only a token holding the marker's last character can complete it.
        return _off_once_written(step, self.marker[-1], lambda text: self.marker in text)


SCHEDULES: dict[str, type[StrengthSchedule]] = {
    s.name: s for s in (UntilAnswer, StepBoundaries, EntropyScaled, AfterSetup, UntilThoughtEnds)
}


def strength_schedule(name: str | StrengthSchedule | None) -> StrengthSchedule | None:
    """A schedule by name (default parameters), a schedule passed through, or ``None`` (constant strength)."""
    if name is None or isinstance(name, StrengthSchedule):
        return name
    if name not in SCHEDULES:
        raise ResidlabError(f"unknown adaptive strength {name!r}.", hint=f"use one of {', '.join(SCHEDULES)}.")
    return SCHEDULES[name]()


def position_scales(positions: torch.Tensor, prompt_lengths: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """[batch, tokens] scale of each input position: 1 in the prompt, ``generated[row, k]`` at the
    ``k``-th generated token (``generated``: [batch, steps so far])."""
    k = positions - prompt_lengths.unsqueeze(1)
    if generated.shape[1] == 0:
        return torch.ones_like(positions, dtype=torch.float32)
    picked = generated.gather(1, k.clamp(0, generated.shape[1] - 1))
    return torch.where(k >= 0, picked, torch.ones_like(picked))
