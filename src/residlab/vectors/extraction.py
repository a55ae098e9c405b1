"""Steering vectors from paired traces: residuals of question+trace at every layer in one pass,
read at the trace's last token or averaged over its tokens; concise minus verbose.

Sign convention: the vector points from verbose towards concise (concise - verbose), so a positive
strength is meant to shorten outputs (measured, not assumed: see the sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from residlab import prompts
from residlab.errors import ResidlabError
from residlab.models.lm import LanguageModel
from residlab.vectors.pairs import TracePair
from residlab.vectors.steering_vector import SteeringVector

READ_MODES = ("mean", "last", "first:N")
METHODS = ("mean_diff", "pca")


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


def trace_states(
    lm: LanguageModel,
    questions: Sequence[str],
    traces: Sequence[str],
    *,
    read: str = "mean",
    batch_size: int = 4,
    template: str = prompts.VERBOSE,
) -> torch.Tensor:
    """[texts, layers, d] float32: each question+trace's residual after every block, at the trace's
    last token (``last``), averaged over the trace's tokens (``mean``) or over its first N tokens
    (``first:N``: the style of the opening, without the "about to end" signal of short traces)."""
    first_n = _parse_read(read)
    use_chat = lm.has_chat_template
    heads = [lm.format_prompt(template.format(question=q), chat=use_chat) for q in questions]
    special = not use_chat
    out = []
    layers = range(lm.num_layers)
    for start in range(0, len(heads), batch_size):
        head_batch = heads[start : start + batch_size]
        full = [h + t for h, t in zip(head_batch, traces[start : start + batch_size], strict=True)]
        head_lengths = [len(lm.tokenizer(h, add_special_tokens=special)["input_ids"]) for h in head_batch]
        batch = lm.encode(full, add_special_tokens=special)
        with lm.record(layers=layers, positions="all") as rec:
            lm.forward(batch)
        stacked = torch.stack([rec[layer] for layer in layers], dim=1).float()  # [b, layers, t, d]
        width = batch.input_ids.shape[1]
        for row, (n, head) in enumerate(zip(batch.lengths.tolist(), head_lengths, strict=True)):
            first = width - n + head  # left padding: real tokens are the last n
            if first >= width:
                raise ResidlabError("a trace is empty after tokenisation.", hint="drop empty traces.")
            states = stacked[row, :, first:, :]
            if first_n is not None:
                states = states[:, :first_n, :]
            out.append(states[:, -1, :] if read == "last" else states.mean(dim=1))
    return torch.stack(out)


def _parse_read(read: str) -> int | None:
    if read in ("mean", "last"):
        return None
    if read.startswith("first:") and read[6:].isdigit() and int(read[6:]) > 0:
        return int(read[6:])
    raise ResidlabError(f"unknown read mode {read!r}.", hint="use mean, last or first:N (e.g. first:32).")


def _cv_separation(concise: torch.Tensor, verbose: torch.Tensor, method: str) -> float:
    """Two-fold cross-validated Cohen's d of projections onto the direction from the other fold."""
    n = concise.shape[0]
    if n < 4:
        return float("nan")
    folds = [torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1]
    scores = []
    for train, test in (folds, folds[::-1]):
        direction = _direction(concise[train], verbose[train], method)
        direction = direction / direction.norm().clamp_min(1e-12)
        c, v = concise[test] @ direction, verbose[test] @ direction
        pooled = ((c.var() + v.var()) / 2).sqrt().clamp_min(1e-12)
        scores.append(float((c.mean() - v.mean()) / pooled))
    return sum(scores) / len(scores)


def _direction(concise: torch.Tensor, verbose: torch.Tensor, method: str) -> torch.Tensor:
    diff = concise - verbose
    mean = diff.mean(dim=0)
    if method == "mean_diff":
        return mean
    # First principal component of the paired differences, scaled to the mean difference's projection
    # and oriented like it.
    _, _, vh = torch.linalg.svd(diff - diff.mean(dim=0), full_matrices=False)
    pc = vh[0]
    projection = float(mean @ pc)
    return pc * projection if projection != 0 else pc


def extract_vector(
    lm: LanguageModel,
    pairs: Sequence[TracePair],
    *,
    read: str = "mean",
    method: str = "mean_diff",
    batch_size: int = 4,
    template: str = prompts.VERBOSE,
) -> ExtractionResult:
    """Mean (or first principal component) of concise - verbose residuals at every layer."""
    if method not in METHODS:
        raise ResidlabError(f"unknown method {method!r}.", hint=f"use one of {', '.join(METHODS)}.")
    if not pairs:
        raise ResidlabError(
            "no pairs to extract a vector from.",
            hint="use more calibration problems, or relax the pair filter (--keep all).",
        )
    questions = [p.question for p in pairs]
    concise = trace_states(
        lm, questions, [p.concise for p in pairs], read=read, batch_size=batch_size, template=template
    )
    verbose = trace_states(
        lm, questions, [p.verbose for p in pairs], read=read, batch_size=batch_size, template=template
    )
    directions, separation, residual = {}, {}, {}
    for layer in range(lm.num_layers):
        c, v = concise[:, layer], verbose[:, layer]
        directions[layer] = _direction(c, v, method)
        separation[layer] = _cv_separation(c, v, method)
        residual[layer] = float(torch.cat([c, v]).norm(dim=-1).mean())
    vector = SteeringVector.from_layers(
        directions,
        model=lm,
        source=f"ASC: {method} of concise - verbose, read={read}, {len(pairs)} pairs "
        f"({pairs[0].concise_source} concise traces)",
        info={
            "n_pairs": len(pairs),
            "read": read,
            "method": method,
            "sign": "concise - verbose",
            "concise_source": pairs[0].concise_source,
            "residual_norm": {str(k): round(v, 4) for k, v in residual.items()},
            "separation": {str(k): round(v, 4) for k, v in separation.items()},
            "mean_concise_tokens": sum(p.concise_tokens for p in pairs) / len(pairs),
            "mean_verbose_tokens": sum(p.verbose_tokens for p in pairs) / len(pairs),
        },
    )
    return ExtractionResult(vector, separation, residual, read, method, len(pairs))
