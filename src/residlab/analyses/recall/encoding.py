"""Recall prompts as token ids: the answer's first token, a wrong answer's, and where the subject is."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from residlab.core.errors import ResidlabError
from residlab.data.recall_prompts import RecallPrompt
from residlab.models.lm import Batch

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token ids, the ids of the first token of its answer and of a wrong answer, and the
    indices (into ``ids``) of the tokens that spell its subject (empty when it names none)."""

    ids: tuple[int, ...]
    answer_id: int
    wrong_id: int
    subject_positions: tuple[int, ...]


@dataclass(frozen=True)
class RecallBatch:
    """Left-padded prompts (the last column is every row's last token) and which prompts they are."""

    rows: tuple[int, ...]
    batch: Batch
    answer_ids: torch.Tensor  # [batch]
    wrong_ids: torch.Tensor  # [batch]
    subject_mask: torch.Tensor  # [batch, tokens] bool: the subject's tokens (padded columns included)


def answer_token(lm: LanguageModel, prompt: str, answer: str) -> int:
    """The first token of the answer as the model would write it next: with a leading space unless
    the prompt ends in whitespace or the answer starts with it (`` Paris`` after ``... is``)."""
    text = answer if answer[:1].isspace() or prompt[-1:].isspace() else " " + answer
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ResidlabError(f"the answer {answer!r} tokenises to nothing.", hint="give a non-empty answer.")
    return int(ids[0])


def _subject_positions(lm: LanguageModel, prompt: str, subject: str | None, ids: list[int]) -> tuple[int, ...]:
    """Tokens that overlap the subject's last occurrence in the prompt (by character offsets when
    the tokenizer gives them, else by tokenising the prompt up to the subject's end)."""
    if not subject:
        return ()
    start = prompt.rfind(subject)
    if start < 0:
        return ()
    end = start + len(subject)
    if getattr(lm.tokenizer, "is_fast", False):
        offsets = lm.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        return tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start)
    before = len(lm.tokenizer(prompt[:start])["input_ids"])
    through = len(lm.tokenizer(prompt[:end])["input_ids"])
    return tuple(range(min(before, through - 1), min(through, len(ids))))


def encode_prompts(lm: LanguageModel, prompts: Sequence[RecallPrompt]) -> list[EncodedPrompt]:
    """Tokenise prompts (special tokens as the tokenizer adds them). Each prompt's wrong answer is
    the answer of the next prompt (cyclically) whose first token differs from its own."""
    if len(prompts) < 2:
        raise ResidlabError(
            f"the recall analysis needs at least 2 prompts, got {len(prompts)}.",
            hint="a wrong answer for each prompt is taken from another prompt's answer.",
        )
    rows = [list(lm.tokenizer(p.prompt)["input_ids"]) for p in prompts]
    answers = [answer_token(lm, p.prompt, p.answer) for p in prompts]
    n = len(prompts)
    encoded = []
    for i, p in enumerate(prompts):
        if not rows[i]:
            raise ResidlabError(f"prompt {i} ({p.prompt!r}) tokenises to nothing.", hint="give non-empty prompts.")
        wrong = next((answers[(i + j) % n] for j in range(1, n) if answers[(i + j) % n] != answers[i]), None)
        if wrong is None:
            raise ResidlabError(
                "every prompt's answer starts with the same token: there is no wrong answer to compare with.",
                hint="give prompts whose answers differ in their first token.",
            )
        positions = _subject_positions(lm, p.prompt, p.subject, rows[i])
        encoded.append(EncodedPrompt(tuple(rows[i]), answers[i], wrong, positions))
    return encoded


def recall_batches(lm: LanguageModel, prompts: Sequence[EncodedPrompt], batch_size: int) -> Iterator[RecallBatch]:
    """Batches in the caller's order (so per-prompt results line up), left-padded by ``lm.pad``."""
    if batch_size < 1:
        raise ResidlabError(f"batch_size must be at least 1, got {batch_size}.", hint="pass --batch-size 1 or more.")
    for start in range(0, len(prompts), batch_size):
        chosen = prompts[start : start + batch_size]
        batch = lm.pad([list(p.ids) for p in chosen])
        width = batch.input_ids.shape[1]
        mask = torch.zeros((len(chosen), width), dtype=torch.bool)
        for row, p in enumerate(chosen):
            pad = width - len(p.ids)
            mask[row, [pad + i for i in p.subject_positions]] = True
        yield RecallBatch(
            rows=tuple(range(start, start + len(chosen))),
            batch=batch,
            answer_ids=torch.tensor([p.answer_id for p in chosen], device=lm.device),
            wrong_ids=torch.tensor([p.wrong_id for p in chosen], device=lm.device),
            subject_mask=mask.to(lm.device),
        )
