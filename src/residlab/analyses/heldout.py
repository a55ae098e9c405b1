"""Cross-entropy of a model on held-out texts, with whatever edit is active, behind a progress bar.

The analyses that change a model (activation swaps, R-Sparse) calibrate on *train* texts and judge
the change here on *evaluation* texts, so the two never overlap (see :func:`corpus_texts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from residlab.analyses.common import TokenBatch, next_token_nll, run_decoder, token_batches, tokenize
from residlab.core.errors import ResidlabError

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class Loss:
    """Mean next-token cross-entropy (nats) over ``tokens`` predictions, and its perplexity."""

    ce: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.ce)


def batches_of(lm: LanguageModel, texts: Sequence[str], max_tokens: int, batch_size: int) -> list[TokenBatch]:
    """The texts tokenised, cut to ``max_tokens`` and batched (sorted by length)."""
    return list(token_batches(lm, tokenize(lm, texts, max_tokens), batch_size))


@torch.inference_mode()
def heldout_loss(lm: LanguageModel, batches: Sequence[TokenBatch], *, desc: str = "", progress: bool = True) -> Loss:
    """Mean next-token cross-entropy of ``lm`` (as currently hooked) over every real next token."""
    from tqdm.auto import tqdm

    losses = [
        next_token_nll(lm, tb, run_decoder(lm, tb))
        for tb in tqdm(batches, desc=desc or "held-out loss", unit="batch", disable=not progress, leave=False)
    ]
    nll = torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
    if nll.numel() == 0:
        raise ResidlabError("no next-token prediction in the evaluation texts.", hint="pass longer texts.")
    return Loss(float(nll.mean()), int(nll.numel()))


def corpus_texts(spec: str, train: int, evaluation: int) -> tuple[list[str], list[str]]:
    """The first ``train`` documents of a corpus's train split and the first ``evaluation`` of its
    held-out split (:func:`residlab.data.corpus.load_corpus`; disjoint by construction)."""
    from residlab.data.corpus import load_corpus

    corpus = load_corpus(spec)
    train_docs, eval_docs = list(corpus.split("train")[:train]), list(corpus.split("eval")[:evaluation])
    if (train and not train_docs) or not eval_docs:
        raise ResidlabError(
            f"corpus {spec!r} has too few documents for a train/eval split.", hint="use a larger corpus, e.g. wiki."
        )
    return train_docs, eval_docs
