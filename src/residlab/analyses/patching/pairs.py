"""Prompt pairs as one left-padded token batch, with the answer tokens the metrics read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from residlab.core.errors import ResidlabError
from residlab.data.prompt_pairs import PromptPair

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class PairBatch:
    """Clean and corrupted prompts, left-padded to one width; row ``i`` of each is pair ``i``.

    Clean and corrupted prompts of a pair have the same number of tokens, so they share their padding:
    column ``j`` holds the same real position in both. ``answer`` / ``wrong`` are each answer's first token.
    """

    clean_ids: torch.Tensor  # [pairs, tokens]
    corrupted_ids: torch.Tensor  # [pairs, tokens]
    attention_mask: torch.Tensor  # [pairs, tokens], 0 = left padding
    answer: torch.Tensor  # [pairs] token id
    wrong: torch.Tensor  # [pairs] token id
    tokens: tuple[str, ...]  # the first pair's clean tokens (with '' for padding): axis labels

    @property
    def num_pairs(self) -> int:
        return int(self.clean_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.clean_ids.shape[1])

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def select(self, rows: torch.Tensor) -> PairBatch:
        """The pairs at ``rows`` (same width)."""
        return PairBatch(
            self.clean_ids[rows], self.corrupted_ids[rows], self.attention_mask[rows],
            self.answer[rows], self.wrong[rows], self.tokens,
        )  # fmt: skip


def encode_pairs(lm: LanguageModel, pairs: Sequence[PromptPair]) -> PairBatch:
    """Tokenise ``pairs`` for ``lm``: a clear error for a pair whose prompts differ in length or whose
    answer and wrong answer start with the same token."""
    if not pairs:
        raise ResidlabError("no prompt pairs were given.", hint="pass at least one pair.")
    tok = lm.tokenizer
    clean_rows, corrupted_rows, answers, wrongs = [], [], [], []
    for i, pair in enumerate(pairs):
        clean, corrupted = (tok(t)["input_ids"] for t in (pair.clean, pair.corrupted))
        if len(clean) != len(corrupted):
            raise ResidlabError(
                f"pair {i}: the clean prompt has {len(clean)} tokens, the corrupted one {len(corrupted)}: "
                f"{pair.clean!r} / {pair.corrupted!r}.",
                hint="patching needs prompts of equal token length; change the corrupted prompt (the built-in "
                "datasets filter such pairs out).",
            )
        answer, wrong = (tok(t, add_special_tokens=False)["input_ids"][:1] for t in (pair.answer, pair.wrong))
        if not answer or not wrong or answer == wrong:
            raise ResidlabError(
                f"pair {i}: answer {pair.answer!r} and wrong answer {pair.wrong!r} do not start with two "
                "different tokens.",
                hint="the metrics compare the answers' first tokens; pick answers that differ there.",
            )
        clean_rows.append(clean)
        corrupted_rows.append(corrupted)
        answers.append(answer[0])
        wrongs.append(wrong[0])
    clean_batch, corrupted_batch = lm.pad(clean_rows), lm.pad(corrupted_rows)
    width = clean_batch.input_ids.shape[1]
    first = [tok.decode([t]) for t in clean_rows[0]]
    labels = ("",) * (width - len(first)) + tuple(first)
    device = clean_batch.input_ids.device
    return PairBatch(
        clean_batch.input_ids, corrupted_batch.input_ids, clean_batch.attention_mask,
        torch.tensor(answers, device=device), torch.tensor(wrongs, device=device), labels,
    )  # fmt: skip
