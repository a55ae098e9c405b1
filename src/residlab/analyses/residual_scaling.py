"""Residual scaling: how large each branch is next to the skip path, how the residual norm grows, and
what scaling every branch by ``alpha`` at inference does to the loss.

Pre-norm block ``h_{l+1} = h_l + a_l + m_l`` (notation of :mod:`residlab.analyses.depth`; ``a``, ``m``
taken after any post-branch norm, so the identity holds in every family). Per layer, averaged over
real tokens at positions >= ``first_position`` (1: position 0, an attention sink with an outsized
norm, is left out):

- **branch / skip**: ``||a_l|| / ||h_l||`` (attention), ``||m_l|| / ||h_l + a_l||`` (MLP; ``/ ||h_l||`` for
  a parallel residual) and ``||h_{l+1} - h_l|| / ||h_l||`` (the whole block). Inception-ResNet scales
  its branches by 0.1-0.3 before the addition; a trained pre-norm transformer learns its own ratio.
- **norm growth**: ``||h_{l+1}|| / ||h_l||`` per token, and the exponential fit of the mean norm
  ``||h_l||`` over layers 1..L-1 (layer 0's input is the bare embedding), to compare with the ~1.045x per
  layer reported for GPT-2 XL.
- **alpha sweep**: every branch output (attention and MLP; in one depth range, or in all layers)
  multiplied by ``alpha`` while the model runs; mean next-token cross-entropy on held-out text vs
  ``alpha``. ``alpha = 1`` is the model as trained.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.common import TokenBatch, next_token_nll, run_decoder, token_batches, tokenize
from residlab.analyses.depth import branch_contributions
from residlab.analyses.means import LayerMeans
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.core.types import Log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.interventions.edit import Edit
    from residlab.models.lm import LanguageModel

INCEPTION_RESNET_RANGE = (0.1, 0.3)  # residual scaling factors of Szegedy et al. (2017)
GPT2_XL_GROWTH = 1.045  # residual-norm growth per layer reported for GPT-2 XL
DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.15, 1.3, 1.5)
DEFAULT_RANGE_ALPHAS = (0.0, 0.3, 0.7, 1.3)
_RATIOS = ("attn_ratio", "mlp_ratio", "block_ratio", "growth", "skip_norm", "out_norm")


@dataclass(frozen=True)
class AlphaCurve:
    """Cross-entropy vs ``alpha`` when the branches of layers ``[start, stop)`` are scaled by ``alpha``."""

    name: str
    start: int
    stop: int
    alphas: list[float]
    ce: list[float]


@dataclass(frozen=True)
class ResidualResult(AnalysisResult):
    """Per-layer ratios and norms (index = layer) and the alpha sweeps."""

    json_file: ClassVar[str] = "residual.json"

    model: str
    family: str
    num_layers: int
    num_texts: int
    num_tokens: int
    first_position: int
    attn_ratio: list[float]
    mlp_ratio: list[float]
    block_ratio: list[float]
    growth: list[float]  # mean over tokens of ||h_{l+1}|| / ||h_l||
    skip_norm: list[float]  # mean ||h_l|| (block input)
    out_norm: list[float]  # mean ||h_{l+1}|| (block output)
    baseline_ce: float
    sweeps: list[AlphaCurve]
    notes: list[str] = field(default_factory=list)

    def fitted_growth(self) -> float:
        """``exp(slope)`` of a least-squares line through ``log mean||h_l||``, layers 1..L (not layer 0's input)."""
        norms = [*self.skip_norm[1:], self.out_norm[-1]]
        xs = list(range(1, len(norms) + 1))
        if len(norms) < 2:
            return float("nan")
        ys = [math.log(v) for v in norms]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        return math.exp(slope)

    def summary(self) -> dict[str, Any]:
        """Growth against GPT-2 XL's, branch ratios against Inception-ResNet's range, the alpha sweeps' best points."""
        lo, hi = INCEPTION_RESNET_RANGE
        ratios = [*self.attn_ratio, *self.mlp_ratio]
        later = self.growth[1:]
        out: dict[str, Any] = {
            "fitted_growth_per_layer": self.fitted_growth(),
            "gpt2_xl_growth_per_layer": GPT2_XL_GROWTH,
            "geometric_mean_token_growth": math.exp(sum(math.log(g) for g in later) / len(later)) if later else None,
            "median_attn_ratio": _median(self.attn_ratio),
            "median_mlp_ratio": _median(self.mlp_ratio),
            "median_block_ratio": _median(self.block_ratio),
            "fraction_of_branches_in_inception_range": sum(lo <= r <= hi for r in ratios) / len(ratios),
            "norm_first_to_last": self.out_norm[-1] / self.skip_norm[1] if self.num_layers > 1 else None,
            "baseline_ce": self.baseline_ce,
        }
        for curve in self.sweeps:
            best = min(range(len(curve.alphas)), key=curve.ce.__getitem__)
            out[f"best_alpha_{curve.name}"] = curve.alphas[best]
            out[f"best_ce_{curve.name}"] = curve.ce[best]
            inside = [c for a, c in zip(curve.alphas, curve.ce, strict=True) if lo <= a <= hi]
            out[f"ce_in_inception_range_{curve.name}"] = min(inside) if inside else None
        return out

    @figure("residual_ratios.png")
    def _ratios(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.axhspan(*INCEPTION_RESNET_RANGE, color="0.85", label="Inception-ResNet scale 0.1-0.3")
        ax1.plot(layers, self.attn_ratio, "o-", ms=3, label="attention ||a|| / ||h||")
        ax1.plot(layers, self.mlp_ratio, "s-", ms=3, label="MLP ||m|| / ||skip||")
        ax1.plot(layers, self.block_ratio, "^-", ms=3, label="block ||dh|| / ||h||")
        ax1.set_yscale("log")
        ax1.set_xlabel("layer")
        ax1.set_ylabel("branch / skip norm (mean over tokens)")
        ax1.legend(fontsize=7)
        ax1.grid(alpha=0.3)
        ax2.semilogy(range(self.num_layers + 1), [*self.skip_norm, self.out_norm[-1]], "o-", ms=3, label="mean ||h_l||")
        base = self.skip_norm[1] if self.num_layers > 1 else self.skip_norm[0]
        ref = [base * GPT2_XL_GROWTH ** (i - 1) for i in range(1, self.num_layers + 1)]
        ax2.semilogy(range(1, self.num_layers + 1), ref, "k--", lw=0.8, label=f"{GPT2_XL_GROWTH}x per layer (GPT-2 XL)")
        ax2.set_xlabel("residual entering layer (L = after the last block)")
        ax2.set_ylabel("norm")
        ax2.set_title(f"fitted growth {self.fitted_growth():.3f}x per layer", fontsize=10)
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
        fig.suptitle(f"{self.model}: residual branches and norms ({self.num_tokens} tokens)", fontsize=10)
        return fig

    @figure("residual_alpha_sweep.png")
    def _sweep(self, plt: Any) -> Figure | None:
        if not self.sweeps:
            return None
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.axvspan(*INCEPTION_RESNET_RANGE, color="0.88", label="0.1-0.3")
        for curve in self.sweeps:
            ax.plot(curve.alphas, curve.ce, "o-", ms=3, label=f"{curve.name} (layers {curve.start}-{curve.stop - 1})")
        ax.axhline(self.baseline_ce, color="k", lw=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("alpha (every branch output x alpha)")
        ax.set_ylabel("held-out cross-entropy (nats/token)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        return fig


def _median(values: Sequence[float]) -> float:
    ordered = sorted(v for v in values if math.isfinite(v))
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# --------------------------------------------------------------------------------------------- measurement


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp(min=torch.finfo(num.dtype).tiny)


@torch.inference_mode()
def _measure_norms(lm: LanguageModel, tb: TokenBatch, valid: torch.Tensor, stats: dict[str, LayerMeans]) -> None:
    layers = list(range(lm.num_layers))
    with lm.record(layers, positions="all", sites=("block_input", "attn", "mlp", "block")) as rec:
        run_decoder(lm, tb)
    for layer in layers:
        h, out = rec[layer, "block_input"].float()[valid], rec[layer, "block"].float()[valid]
        a, m = branch_contributions(lm, layer, rec[layer, "attn"], rec[layer, "mlp"])
        a, m = a[valid], m[valid]
        skip = h if lm.arch.parallel_residual else h + a
        h_norm, out_norm = h.norm(dim=-1), out.norm(dim=-1)
        stats["attn_ratio"].add(layer, _ratio(a.norm(dim=-1), h_norm))
        stats["mlp_ratio"].add(layer, _ratio(m.norm(dim=-1), skip.norm(dim=-1)))
        stats["block_ratio"].add(layer, _ratio((out - h).norm(dim=-1), h_norm))
        stats["growth"].add(layer, _ratio(out_norm, h_norm))
        stats["skip_norm"].add(layer, h_norm)
        stats["out_norm"].add(layer, out_norm)


def branch_scaling(lm: LanguageModel, layers: Sequence[int], alpha: float) -> list[Edit]:
    """Edits that multiply every attention and MLP output added to the residual at ``layers`` by ``alpha``.

    With sandwich norms (Gemma 2/3) the scaled values are the post-norms' outputs, the tensors that
    are actually added (scaling before an RMS norm would be undone by it).
    """
    arch = lm.arch
    sites = [
        "post_attn_norm" if arch.post_attn_norm is not None else "attn",
        "post_mlp_norm" if arch.post_mlp_norm is not None else "mlp",
    ]

    def scale(value: torch.Tensor, ctx: Any) -> torch.Tensor:
        return value * alpha

    return [lm.edit(list(layers), site, scale) for site in sites]


@torch.inference_mode()
def mean_ce(lm: LanguageModel, batches: Sequence[TokenBatch], edits: Callable[[], list[Edit]] | None = None) -> float:
    """Mean next-token cross-entropy (nats) over ``batches``, with ``edits()`` active during each pass."""
    from contextlib import ExitStack

    total, count = 0.0, 0
    for tb in batches:
        with ExitStack() as stack:
            for edit in edits() if edits else []:
                stack.enter_context(edit)
            nll = next_token_nll(lm, tb, run_decoder(lm, tb))
        total += float(nll.sum())
        count += int(nll.numel())
    if not count:
        raise ResidlabError("no next token to predict in any text.", hint="pass texts of at least two tokens.")
    return total / count


def depth_ranges(num_layers: int, parts: int) -> list[tuple[str, int, int]]:
    """``parts`` contiguous depth ranges (name, start, stop) covering every layer, as equal as possible."""
    parts = max(1, min(parts, num_layers))
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    names = {1: ["all"], 2: ["early", "late"], 3: ["early", "middle", "late"]}.get(parts)
    labels = names or [f"range{i}" for i in range(parts)]
    return [(labels[i], bounds[i], bounds[i + 1]) for i in range(parts)]


def analyze_residual(
    lm: LanguageModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    first_position: int = 1,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    range_alphas: Sequence[float] = DEFAULT_RANGE_ALPHAS,
    ranges: int = 3,
    log: Log | None = None,
    progress: bool = True,
) -> ResidualResult:
    """Branch/skip ratios, norm growth and the alpha sweeps of ``lm`` on (held-out) ``texts``.

    ``alphas`` scale every layer's branches; ``range_alphas`` the branches of one of ``ranges`` depth
    ranges at a time (empty, or ``ranges < 2``, leaves those sweeps out).
    """
    from tqdm.auto import tqdm

    log = log or (lambda message: None)
    if first_position < 0:
        raise ResidlabError(f"first_position must be >= 0, got {first_position}.", hint="pass 0 or 1.")
    for a in [*alphas, *range_alphas]:
        if not math.isfinite(a):
            raise ResidlabError(f"alpha {a} is not a finite number.", hint="pass finite alphas such as 0,0.5,1.")
    batches = list(token_batches(lm, tokenize(lm, texts, max_tokens), batch_size))
    stats = {name: LayerMeans(lm.num_layers) for name in _RATIOS}
    num_tokens = 0
    for tb in batches:
        valid = tb.valid(first_position)
        num_tokens += int(valid.sum())
        _measure_norms(lm, tb, valid, stats)
    if num_tokens == 0:
        raise ResidlabError(f"no token at position >= {first_position}.", hint="pass longer texts.")

    plans: list[tuple[str, int, int, list[float]]] = []
    if alphas:
        plans.append(("all", 0, lm.num_layers, sorted({float(a) for a in alphas})))
    if range_alphas and ranges >= 2:
        plans += [
            (n, s, e, sorted({float(a) for a in range_alphas})) for n, s, e in depth_ranges(lm.num_layers, ranges)
        ]
    bar = tqdm(total=1 + sum(len(p[3]) for p in plans), unit="pass", desc="alpha sweep", disable=not progress)
    baseline = mean_ce(lm, batches)
    bar.update()
    sweeps = []
    for name, start, stop, values in plans:
        ce = []
        for alpha in values:
            edits = functools.partial(branch_scaling, lm, range(start, stop), alpha)
            ce.append(baseline if alpha == 1.0 else mean_ce(lm, batches, edits))
            bar.update()
            log(f"  {name} (layers {start}-{stop - 1}) alpha {alpha:g}: CE {ce[-1]:.4f}")
        sweeps.append(AlphaCurve(name, start, stop, values, ce))
    bar.close()
    notes = []
    if lm.arch.post_attn_norm is not None:
        notes.append("sandwich norms: branches measured and scaled after their post-norms.")
    if lm.arch.parallel_residual:
        notes.append("parallel residual: the MLP's skip is the block input h.")
    means = {name: s.means() for name, s in stats.items()}
    return ResidualResult(
        model=lm.name,
        family=lm.arch.family,
        num_layers=lm.num_layers,
        num_texts=len(texts),
        num_tokens=num_tokens,
        first_position=first_position,
        baseline_ce=baseline,
        sweeps=sweeps,
        notes=notes,
        **means,
    )
