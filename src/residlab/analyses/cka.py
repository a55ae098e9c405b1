"""Layer x layer representational similarity (linear CKA) within one model or between two on the same text.

Every layer's block output is read at every real token at position >= ``first_position`` (1 by
default: the first token is an attention sink with a huge norm that would dominate every Gram
matrix). States stream into a buffer that is shuffled with a fixed seed and cut into minibatches of
``minibatch`` examples; :class:`~residlab.analyses.cka_math.CkaAccumulator` sums their HSIC terms
(biased and debiased) so any number of tokens fits in memory.

**Two models, two tokenisers.** The examples must be the same inputs on both sides, so with two
models the unit is a *word* (a maximal run of non-space characters) instead of a token: each token
belongs to the word holding its first non-space character (its character offsets from the fast
tokeniser), a word's state is the mean of its tokens' states, and only words that both models cover
(at least one token each, none at a position before ``first_position``) are kept. Text cut by
``max_tokens`` in either model ends the text for both.

The even-stride mapping of the guidance paper (:func:`~residlab.analyses.cka_math.even_stride_mapping`)
pairs each layer of the first model with one of the second; the summary reads CKA along it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.cka_math import CkaAccumulator, even_stride_mapping, mapped_values
from residlab.analyses.common import TokenBatch, run_decoder
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.core.types import Log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class CkaResult(AnalysisResult):
    """CKA matrices ``[layer of model_a][layer of model_b]`` (model_b = model_a within one model)."""

    json_file: ClassVar[str] = "cka.json"

    model_a: str
    model_b: str
    layers_a: int
    layers_b: int
    unit: str  # "token" (one model) or "word" (two models, pooled per word)
    num_texts: int
    num_examples: int
    minibatch: int
    num_minibatches: int
    first_position: int
    biased: list[list[float]]
    debiased: list[list[float]]
    mapping: list[int]  # even-stride guide layer (of model_b) for each layer of model_a
    notes: list[str] = field(default_factory=list)

    @property
    def same_model(self) -> bool:
        return self.model_a == self.model_b and self.unit == "token"

    def summary(self) -> dict[str, Any]:
        """CKA along the even-stride mapping, each row's best match, and (one model) off-diagonal means."""
        out: dict[str, Any] = {"num_examples": self.num_examples}
        for name in ("biased", "debiased"):
            matrix = getattr(self, name)
            along = mapped_values(matrix, self.mapping)
            out[f"mapped_mean_{name}"] = sum(along) / len(along)
            out[f"best_match_{name}"] = [max(range(len(row)), key=row.__getitem__) for row in matrix]
            if self.same_model:
                n = self.layers_a
                off = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
                adjacent = [matrix[i][i + 1] for i in range(n - 1)]
                out[f"off_diagonal_mean_{name}"] = sum(off) / len(off) if off else float("nan")
                out[f"adjacent_mean_{name}"] = sum(adjacent) / len(adjacent) if adjacent else float("nan")
                out[f"first_last_{name}"] = matrix[0][n - 1]
        return out

    @figure("cka_matrices.png")
    def _matrices(self, plt: Any) -> Figure:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
        for ax, name in zip(axes, ("biased", "debiased"), strict=True):
            image = ax.imshow(getattr(self, name), origin="lower", vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.plot(self.mapping, range(self.layers_a), "c.", ms=4, label="even-stride mapping")
            ax.set_xlabel(f"{self.model_b} layer")
            ax.set_ylabel(f"{self.model_a} layer")
            ax.set_title(f"linear CKA, {name}", fontsize=10)
            fig.colorbar(image, ax=ax)
        axes[0].legend(fontsize=7, loc="upper left")
        fig.suptitle(f"{self.num_examples} {self.unit}s, minibatches of {self.minibatch}", fontsize=10)
        return fig

    @figure("cka_mapped.png")
    def _mapped(self, plt: Any) -> Figure:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, style in (("biased", "o-"), ("debiased", "s-")):
            ax.plot(range(self.layers_a), mapped_values(getattr(self, name), self.mapping), style, ms=3, label=name)
        ax.set_xlabel(f"{self.model_a} layer (mapped to {self.model_b} by even stride)")
        ax.set_ylabel("linear CKA")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig


# --------------------------------------------------------------------------------------------- reading states


@dataclass(frozen=True)
class _Encoded:
    """One text in one model: token ids (cut) and, per token, the word it belongs to (-1: none)."""

    ids: list[int]
    word_of_token: list[int]


def _encode(lm: LanguageModel, text: str, words: Sequence[tuple[int, int]], max_tokens: int) -> _Encoded:
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"])[:max_tokens], list(enc["offset_mapping"])[:max_tokens]
    word_of_token, w = [], 0
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        if start >= end:  # special token or pure whitespace
            word_of_token.append(-1)
            continue
        while w < len(words) and words[w][1] <= start:
            w += 1
        word_of_token.append(w if w < len(words) and words[w][0] <= start else -1)
    return _Encoded(ids, word_of_token)


def _check_fast(lm: LanguageModel) -> None:
    if not getattr(lm.tokenizer, "is_fast", False):
        raise ResidlabError(
            f"{lm.name}'s tokenizer gives no character offsets (not a fast tokenizer).",
            hint="compare models whose tokenizers are fast (every packaged model's is).",
        )


@torch.inference_mode()
def _layer_states(lm: LanguageModel, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """[layers, tokens, d] block outputs (float32) of each row, in order."""
    tb = TokenBatch(tuple(range(len(rows))), lm.pad([list(r) for r in rows]))
    with lm.record(range(lm.num_layers), positions="all", sites=("block",)) as rec:
        run_decoder(lm, tb)
    stacked = torch.stack([rec[layer, "block"].float() for layer in range(lm.num_layers)])  # [L, B, T, d]
    mask = tb.batch.attention_mask.bool()
    return [stacked[:, i, mask[i]] for i in range(len(rows))]


def _pool(states: torch.Tensor, word_of_token: list[int], keep: list[int]) -> torch.Tensor:
    """[layers, len(keep), d]: mean over each kept word's tokens."""
    index = torch.tensor(word_of_token)
    return torch.stack([states[:, index == w].mean(1) for w in keep], dim=1)


def _covered(enc: _Encoded, first_position: int) -> set[int]:
    early = {w for i, w in enumerate(enc.word_of_token[:first_position]) if w >= 0}
    return {w for w in enc.word_of_token if w >= 0} - early


def _aligned_examples(
    models: Sequence[LanguageModel], texts: Sequence[str], max_tokens: int, first_position: int, batch_size: int
) -> Iterator[list[torch.Tensor]]:
    """Per batch of texts, one [layers, examples, d] tensor per model (tokens, or words for two models)."""
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        if len(models) == 1:
            lm = models[0]
            rows = [list(lm.tokenizer(t)["input_ids"])[:max_tokens] for t in chunk]
            states = _layer_states(lm, [r for r in rows if r])
            yield [torch.cat([s[:, first_position:] for s in states], dim=1)]
            continue
        words = [[m.span() for m in _WORD.finditer(t)] for t in chunk]
        encoded = [[_encode(lm, t, w, max_tokens) for t, w in zip(chunk, words, strict=True)] for lm in models]
        # a cut text ends, for both models, at the last word that both still reach in full
        keeps = []
        for i in range(len(chunk)):
            last = min(max((w for w in e[i].word_of_token), default=-1) for e in encoded)
            common = set.intersection(*(_covered(e[i], first_position) for e in encoded))
            keeps.append(sorted(w for w in common if w < last or last == len(words[i]) - 1))
        per_model = []
        for lm, encs in zip(models, encoded, strict=True):
            states = _layer_states(lm, [e.ids for e in encs])
            pooled = [_pool(s, e.word_of_token, k) for s, e, k in zip(states, encs, keeps, strict=True) if k]
            per_model.append(torch.cat(pooled, dim=1) if pooled else torch.zeros(lm.num_layers, 0, lm.hidden_size))
        yield per_model


class _Shuffler:
    """A buffer of examples (kept aligned across models) that yields shuffled minibatches."""

    def __init__(self, minibatch: int, seed: int) -> None:
        self.minibatch = minibatch
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[torch.Tensor] | None = None

    def push(self, parts: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        self.pending = (
            parts if self.pending is None else [torch.cat(p, 1) for p in zip(self.pending, parts, strict=True)]
        )
        while self.pending[0].shape[1] >= 4 * self.minibatch:  # shuffle within a window of four minibatches
            yield from self._cut(full_only=True)

    def _cut(self, full_only: bool) -> Iterator[list[torch.Tensor]]:
        assert self.pending is not None
        order = torch.randperm(self.pending[0].shape[1], generator=self.generator)
        shuffled = [p[:, order] for p in self.pending]
        n = shuffled[0].shape[1]
        stop = n - n % self.minibatch if full_only else n
        for start in range(0, stop, self.minibatch):
            part = [p[:, start : start + self.minibatch] for p in shuffled]
            if part[0].shape[1] >= max(4, self.minibatch // 2):  # a small remainder would only add noise
                yield part
        self.pending = [p[:, stop:] for p in shuffled]

    def flush(self) -> Iterator[list[torch.Tensor]]:
        if self.pending is not None and self.pending[0].shape[1]:
            yield from self._cut(full_only=False)


def analyze_cka(
    lm: LanguageModel,
    texts: Sequence[str],
    other: LanguageModel | None = None,
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    minibatch: int = 256,
    first_position: int = 1,
    seed: int = 0,
    log: Log | None = None,
    progress: bool = True,
) -> CkaResult:
    """Layer x layer linear CKA (biased and debiased) of ``lm`` with itself, or with ``other`` per word."""
    from tqdm.auto import tqdm

    if minibatch < 4:
        raise ResidlabError(f"minibatch must be at least 4, got {minibatch}.", hint="pass --minibatch 4 or more.")
    if not texts:
        raise ResidlabError("no texts were given.", hint="pass at least one text.")
    models = [lm] if other is None else [lm, other]
    if other is not None:
        for m in models:
            _check_fast(m)
    log = log or (lambda message: None)
    acc = CkaAccumulator(lm.num_layers, models[-1].num_layers)
    shuffler = _Shuffler(minibatch, seed)
    bar = tqdm(total=len(texts), unit="text", desc="cka", disable=not progress)
    for parts in _aligned_examples(models, texts, max_tokens, first_position, batch_size):
        for batch in shuffler.push(parts):
            acc.add(batch[0], batch[1] if other is not None else None)
        bar.update(min(batch_size, bar.total - bar.n))
    bar.close()
    for batch in shuffler.flush():
        acc.add(batch[0], batch[1] if other is not None else None)
    matrices = acc.result()
    log(f"cka: {matrices.num_examples} examples in {matrices.num_minibatches} minibatches")
    notes = []
    if other is not None:
        notes.append("examples are words: each model's token states mean-pooled per word, words both models cover.")
    b = models[-1]
    return CkaResult(
        model_a=lm.name,
        model_b=b.name,
        layers_a=lm.num_layers,
        layers_b=b.num_layers,
        unit="token" if other is None else "word",
        num_texts=len(texts),
        num_examples=matrices.num_examples,
        minibatch=minibatch,
        num_minibatches=matrices.num_minibatches,
        first_position=first_position,
        biased=matrices.biased,
        debiased=matrices.debiased,
        mapping=even_stride_mapping(lm.num_layers, b.num_layers),
        notes=notes,
    )
