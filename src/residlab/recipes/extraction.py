"""Contrastive steering vectors: residuals of (prompt + completion) at every layer in one pass, read
over each completion's tokens, and the direction from the negative to the positive completions.

Generic: any prompts and any two sets of completions (the ASC method builds its concise-vs-verbose
vector on it). Directions come from a small registry of plain callables, so a new aggregator is one
function; the separation of every layer is a cross-validated effect size, so layers can be compared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from residlab.core.errors import ResidlabError
from residlab.models.lm import LanguageModel
from residlab.vectors.steering_vector import SteeringVector

Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (positive [n, d], negative [n, d]) -> [d]


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean of the paired differences ``positive - negative``."""
    return (positive - negative).mean(dim=0)


def first_principal_component(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """First principal component of the paired differences, scaled to the mean difference's
    projection on it and oriented like the mean difference."""
    diff = positive - negative
    mean = diff.mean(dim=0)
    _, _, vh = torch.linalg.svd(diff - mean, full_matrices=False)
    pc = vh[0]
    projection = float(mean @ pc)
    return pc * projection if projection != 0 else pc


AGGREGATORS: dict[str, Aggregator] = {"mean_diff": mean_difference, "pca": first_principal_component}


@dataclass(frozen=True)
class ExtractionResult:
    vector: SteeringVector  # every layer
    separation: dict[int, float]  # cross-validated effect size of the direction, per layer
    residual_norm: dict[int, float]  # mean norm of the residual states read, per layer
    read: str
    method: str
    n_pairs: int

    @property
    def best_layer(self) -> int:
        return max(self.separation, key=self.separation.__getitem__)

    def relative_norm(self, layer: int) -> float:
        return self.vector.norm(layer) / self.residual_norm[layer]


def parse_read(read: str) -> int | None:
    """``mean`` / ``last`` -> None; ``first:N`` -> N; anything else is a clear error."""
    if read in ("mean", "last"):
        return None
    if read.startswith("first:") and read[6:].isdigit() and int(read[6:]) > 0:
        return int(read[6:])
    raise ResidlabError(f"unknown read mode {read!r}.", hint="use mean, last or first:N (e.g. first:32).")


def completion_states(
    lm: LanguageModel,
    heads: Sequence[str],
    completions: Sequence[str],
    *,
    read: str = "mean",
    batch_size: int = 4,
    add_special_tokens: bool = False,
) -> torch.Tensor:
    """[texts, layers, d] float32: each head+completion's residual after every block, at the
    completion's last token (``last``), averaged over its tokens (``mean``) or over its first N tokens
    (``first:N``). ``heads`` are prompts already rendered as the model sees them."""
    first_n = parse_read(read)
    out = []
    layers = range(lm.num_layers)
    for start in range(0, len(heads), batch_size):
        head_batch = heads[start : start + batch_size]
        full = [h + t for h, t in zip(head_batch, completions[start : start + batch_size], strict=True)]
        head_lengths = [len(lm.tokenizer(h, add_special_tokens=add_special_tokens)["input_ids"]) for h in head_batch]
        batch = lm.encode(full, add_special_tokens=add_special_tokens)
        with lm.record(layers=layers, positions="all") as rec:
            lm.forward(batch)
        stacked = torch.stack([rec[layer] for layer in layers], dim=1).float()  # [b, layers, t, d]
        width = batch.input_ids.shape[1]
        for row, (n, head) in enumerate(zip(batch.lengths.tolist(), head_lengths, strict=True)):
            first = width - n + head  # left padding: real tokens are the last n
            if first >= width:
                raise ResidlabError("a completion is empty after tokenisation.", hint="drop empty completions.")
            states = stacked[row, :, first:, :]
            if first_n is not None:
                states = states[:, :first_n, :]
            out.append(states[:, -1, :] if read == "last" else states.mean(dim=1))
    return torch.stack(out)


def cross_validated_separation(positive: torch.Tensor, negative: torch.Tensor, aggregate: Aggregator) -> float:
    """Two-fold cross-validated Cohen's d of projections onto the direction from the other fold."""
    n = positive.shape[0]
    if n < 4:
        return float("nan")
    folds = [torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1]
    scores = []
    for train, test in (folds, folds[::-1]):
        direction = aggregate(positive[train], negative[train])
        direction = direction / direction.norm().clamp_min(1e-12)
        p, q = positive[test] @ direction, negative[test] @ direction
        pooled = ((p.var() + q.var()) / 2).sqrt().clamp_min(1e-12)
        scores.append(float((p.mean() - q.mean()) / pooled))
    return sum(scores) / len(scores)


def contrast_vector(
    lm: LanguageModel,
    heads: Sequence[str],
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    read: str = "mean",
    method: str = "mean_diff",
    batch_size: int = 4,
    add_special_tokens: bool = False,
    source: str = "",
    info: Mapping[str, Any] | None = None,
) -> ExtractionResult:
    """The direction from ``negative`` to ``positive`` completions of the same ``heads``, at every layer."""
    aggregate = AGGREGATORS.get(method)
    if aggregate is None:
        raise ResidlabError(f"unknown method {method!r}.", hint=f"use one of {', '.join(AGGREGATORS)}.")
    if not heads:
        raise ResidlabError(
            "no pairs to extract a vector from.",
            hint="use more calibration problems, or relax the pair filter (--keep all).",
        )
    kwargs: dict[str, Any] = dict(read=read, batch_size=batch_size, add_special_tokens=add_special_tokens)
    pos = completion_states(lm, heads, positive, **kwargs)
    neg = completion_states(lm, heads, negative, **kwargs)
    directions, separation, residual = {}, {}, {}
    for layer in range(lm.num_layers):
        p, q = pos[:, layer], neg[:, layer]
        directions[layer] = aggregate(p, q)
        separation[layer] = cross_validated_separation(p, q, aggregate)
        residual[layer] = float(torch.cat([p, q]).norm(dim=-1).mean())
    vector = SteeringVector.from_layers(
        directions,
        model=lm,
        source=source,
        info={
            **(info or {}),
            "read": read,
            "method": method,
            "residual_norm": {str(k): round(v, 4) for k, v in residual.items()},
            "separation": {str(k): round(v, 4) for k, v in separation.items()},
        },
    )
    return ExtractionResult(vector, separation, residual, read, method, len(heads))
