"""``analyze rsparse``: R-Sparse (arXiv 2504.19449) at a target sparsity, against its extremes and CETT.

What is compared and how is in :mod:`residlab.analyses.rsparse_edit` (the variants) and
:mod:`residlab.analyses.rsparse_speed` (the wall-clock); the form itself in
:mod:`residlab.analyses.rsparse_factors`. Calibration (the alpha search, the CETT thresholds) reads
the *train* texts only; every perplexity is on the *evaluation* texts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.common import TokenBatch
from residlab.analyses.heldout import Loss, batches_of, heldout_loss
from residlab.analyses.means import mean
from residlab.analyses.result import AnalysisResult, figure
from residlab.analyses.rsparse_edit import (
    ALPHA_GRID,
    Key,
    Variant,
    capture_inputs,
    cett_down_variant,
    factorise,
    measure,
    search_alphas,
)
from residlab.analyses.rsparse_factors import Budget, SparseLowRank
from residlab.analyses.rsparse_speed import SpeedRow, time_linears
from residlab.core.errors import ResidlabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class RSparseResult(AnalysisResult):
    """Perplexity of every variant, the searched alphas and the measured speed of one block's linears."""

    json_file: ClassVar[str] = "rsparse.json"

    model: str
    family: str
    layers: list[int]
    sparsity: float
    uniform_alpha: float
    alpha_grid: list[float]
    train_texts: int
    eval_texts: int
    eval_tokens: int
    search_tokens: int  # train tokens per linear layer in the alpha search and CETT thresholds
    dense_ce: float
    dense_perplexity: float
    variants: list[Variant]
    searched_alphas: dict[str, list[float]]  # linear name -> alpha per layer
    search_errors: dict[str, list[float]]  # linear name -> mean relative output error at each grid alpha
    speed_layer: int | None = None
    speed_threads: int = 1
    speed: list[SpeedRow] = field(default_factory=list)

    def derived(self) -> dict[str, Any]:
        return {"speed_speedup": [row.speedup for row in self.speed]}

    def summary(self) -> dict[str, Any]:
        """Perplexity increase and MACs kept per variant, the mean searched alpha, the block's speed-up."""
        out: dict[str, Any] = {"dense_perplexity": self.dense_perplexity}
        for v in self.variants:
            out[f"{v.name}_ppl_increase_percent"] = v.ppl_increase_percent
            out[f"{v.name}_macs_kept"] = v.macs_kept
        out["mean_searched_alpha"] = mean([a for alphas in self.searched_alphas.values() for a in alphas])
        for variant in dict.fromkeys(r.variant for r in self.speed):
            rows = [r for r in self.speed if r.variant == variant]
            dense, sparse = sum(r.dense_us for r in rows), sum(r.sparse_us for r in rows)
            out[f"layer_dense_us_{variant}"], out[f"layer_sparse_us_{variant}"] = dense, sparse
            out[f"layer_speedup_{variant}"] = dense / sparse if sparse else float("nan")
        return out

    @figure("rsparse_perplexity.png")
    def _perplexity_figure(self, plt: Any) -> Figure:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        names = [v.name for v in self.variants]
        colors = ["C0" if v.touched == "all linears" else "C2" for v in self.variants]
        ax.bar(range(len(names)), [v.ppl_increase_percent for v in self.variants], color=colors)
        for i, v in enumerate(self.variants):
            ax.annotate(f"{100 * v.macs_kept:.0f}%", (i, v.ppl_increase_percent), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylabel("held-out perplexity increase over dense (%)")
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(
            f"{self.model}: {100 * self.sparsity:g}% sparsity (labels: MACs kept; blue: all linears, green: "
            f"MLP down only); dense ppl {self.dense_perplexity:.2f}",
            fontsize=9,
        )
        return fig

    @figure("rsparse_alphas.png")
    def _alpha_figure(self, plt: Any) -> Figure:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
        for name, alphas in self.searched_alphas.items():
            ax1.plot(self.layers, alphas, "o-", ms=3, label=name)
            ax2.plot(self.alpha_grid, self.search_errors[name], "o-", ms=3, label=name)
        ax1.set_xlabel("layer")
        ax1.set_ylabel("searched alpha (1 = all sparse, 0 = all low-rank)")
        ax1.legend(fontsize=7)
        ax1.grid(alpha=0.3)
        ax2.set_xlabel("alpha")
        ax2.set_ylabel("relative output error (train tokens, mean over layers)")
        ax2.set_yscale("log")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
        return fig

    @figure("rsparse_speed.png")
    def _speed_figure(self, plt: Any) -> Figure | None:
        if not self.speed:
            return None
        fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(self.speed)), 4))
        xs = range(len(self.speed))
        ax.bar([x - 0.2 for x in xs], [r.dense_us for r in self.speed], width=0.4, label="dense F.linear")
        ax.bar([x + 0.2 for x in xs], [r.sparse_us for r in self.speed], width=0.4, label="sparse + low-rank path")
        ax.set_xticks(
            list(xs), [f"{r.linear.split('.')[-1]}\n{r.variant}\na={r.alpha:g}" for r in self.speed], fontsize=6
        )
        ax.set_ylabel("microseconds per token (median)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"layer {self.speed_layer}, one token, {self.speed_threads} thread(s)", fontsize=10)
        return fig


def _budgets(factors: dict[Key, Any], sparsity: float, alphas: dict[Key, float] | float) -> dict[Key, Budget]:
    return {k: f.budget(sparsity, alphas if isinstance(alphas, float) else alphas[k]) for k, f in factors.items()}


TOPK, SEARCHED = "alpha = 1: top-k input channels only", "alpha per linear from the train-text search"
ALL_LINEARS, MLP_DOWN = "all linears", "MLP down-projection"


def _down_variants(
    lm: LanguageModel,
    evaluation: list[TokenBatch],
    factors: dict[Key, SparseLowRank],
    inputs: dict[Key, torch.Tensor],
    alphas: dict[Key, float],
    sparsity: float,
    dense: Loss,
    first_position: int,
    progress: bool,
) -> list[Variant]:
    """CETT, top-k and searched R-Sparse on the MLP down-projections alone, at the same sparsity."""
    down = {k: f for k, f in factors.items() if k[1] == lm.arch.mlp_down}
    if not down:
        return []
    activations = {k[0]: inputs[k] for k in down}
    out = [
        cett_down_variant(
            lm, evaluation, activations, sparsity, dense, first_position=first_position, progress=progress
        )
    ]
    for name, a, text in (("topk_down", 1.0, TOPK), ("searched_down", alphas, SEARCHED)):
        out.append(measure(lm, evaluation, down, _budgets(down, sparsity, a), dense, name, text, MLP_DOWN, progress))
    return out


def _per_linear_name(
    alphas: dict[Key, float], errors: dict[Key, list[float]]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Searched alpha per layer, and the mean search error at each grid alpha, keyed by the linear's name."""
    by_name: dict[str, list[float]] = defaultdict(list)
    err_by_name: dict[str, list[list[float]]] = defaultdict(list)
    for (layer, name), alpha in alphas.items():
        by_name[name].append(alpha)
        err_by_name[name].append(errors[layer, name])
    return dict(by_name), {n: torch.tensor(e).mean(0).tolist() for n, e in err_by_name.items()}


def _speed_rows(
    factors: dict[Key, SparseLowRank],
    inputs: dict[Key, torch.Tensor],
    alphas: dict[Key, float],
    sparsity: float,
    layer: int,
    threads: int,
) -> list[SpeedRow]:
    """One-token timing of ``layer``'s linears at the searched alpha, alpha = 1 and alpha = 0."""
    picked = {name: f for (at, name), f in factors.items() if at == layer}
    one_token = {name: inputs[layer, name][0] for name in picked}
    rows = []
    for variant, alpha in (("searched", None), ("topk", 1.0), ("lowrank", 0.0)):
        budgets = {n: f.budget(sparsity, alphas[layer, n] if alpha is None else alpha) for n, f in picked.items()}
        rows += [replace(row, variant=variant) for row in time_linears(picked, one_token, budgets, threads=threads)]
    return rows


def analyze_rsparse(
    lm: LanguageModel,
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    *,
    sparsity: float = 0.5,
    uniform_alpha: float = 0.9,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    layers: Sequence[int] | None = None,
    search_tokens: int = 256,
    max_tokens: int = 128,
    batch_size: int = 8,
    first_position: int = 1,
    speed: bool = True,
    speed_threads: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> RSparseResult:
    """R-Sparse at ``sparsity`` on every linear of ``layers`` (all by default): perplexity of dense,
    alpha = 1, alpha = 0, ``uniform_alpha``, searched alpha, and of the MLP-down-only comparison with
    CETT; FLOPs kept; and (``speed``) the one-token wall-clock of the middle layer's linears."""
    chosen = sorted({lm.check_layer(x) for x in layers}) if layers else list(range(lm.num_layers))
    Budget(1, 1, sparsity, uniform_alpha)  # checks the ranges
    if not alpha_grid or search_tokens < 1:
        raise ResidlabError("the alpha grid and the search tokens must not be empty.", hint="keep the defaults.")
    train = batches_of(lm, train_texts, max_tokens, batch_size)
    evaluation = batches_of(lm, eval_texts, max_tokens, batch_size)
    dense = heldout_loss(lm, evaluation, desc="dense", progress=progress)
    factors = factorise(lm, chosen, sparsity, progress=progress)
    inputs = capture_inputs(
        lm, train, list(factors), tokens=search_tokens, first_position=first_position, seed=seed, progress=progress
    )
    alphas, errors = search_alphas(factors, inputs, sparsity, alpha_grid, progress=progress)
    runs: list[tuple[str, float | dict[Key, float], str]] = [
        ("topk", 1.0, TOPK),
        ("lowrank", 0.0, "alpha = 0: truncated SVD only"),
        ("uniform", float(uniform_alpha), f"alpha = {uniform_alpha:g} in every layer"),
        ("searched", alphas, SEARCHED),
    ]
    variants = [
        measure(lm, evaluation, factors, _budgets(factors, sparsity, a), dense, name, text, ALL_LINEARS, progress)
        for name, a, text in runs
    ]
    variants += _down_variants(lm, evaluation, factors, inputs, alphas, sparsity, dense, first_position, progress)
    by_name, err_by_name = _per_linear_name(alphas, errors)
    speed_layer = chosen[len(chosen) // 2] if speed else None
    rows = _speed_rows(factors, inputs, alphas, sparsity, speed_layer, speed_threads) if speed_layer is not None else []
    return RSparseResult(
        model=lm.name,
        family=lm.arch.family,
        layers=chosen,
        sparsity=sparsity,
        uniform_alpha=float(uniform_alpha),
        alpha_grid=[float(a) for a in alpha_grid],
        train_texts=len(train_texts),
        eval_texts=len(eval_texts),
        eval_tokens=dense.tokens,
        search_tokens=min(t.shape[0] for t in inputs.values()),
        dense_ce=dense.ce,
        dense_perplexity=dense.perplexity,
        variants=variants,
        searched_alphas=by_name,
        search_errors=err_by_name,
        speed_layer=speed_layer,
        speed_threads=speed_threads,
        speed=rows,
    )
