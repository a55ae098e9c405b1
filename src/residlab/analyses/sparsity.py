"""Activation sparsity of the MLP hidden layer (and of token-to-token changes).

The activation ``a`` of layer ``l`` is the MLP's hidden vector, the input of its down-projection
``W_down`` (site ``mlp_act``; for gated MLPs ``act(gate) * up``). Measured per layer, over real
tokens at positions >= ``first_position`` (1 by default: the first token is often an attention sink
with atypical activations):

- **Lazy neuron** (Li et al. 2022): the fraction of nonzero activations, ``a != 0`` exactly (the
  meaningful number for ReLU models) and ``|a| > threshold`` (a stated absolute threshold, 0.01 by
  default, for SiLU/GELU models, whose activations are almost never exactly 0).
- **CETT** (Sparsing Law, Luo et al. 2024): neuron ``i``'s output norm is ``n_i = |a_i| * ||W_down[:, i]||``.
  Dropping every neuron with ``n_i <= t`` leaves the error ``W_down a_dropped`` (``a_dropped`` = the
  dropped neurons' activations, the others zeroed); ``CETT(t)`` = mean over tokens of
  ``||W_down a_dropped|| / ||W_down a||`` (down-projection bias excluded). CETT is the *relative
  error* of the truncation, so ``CETT(0) = 0`` (nothing but exact zeros is dropped), it reaches 1
  once ``t >= max n_i`` (everything dropped) and grows with ``t`` (not strictly monotone in general:
  dropped terms can cancel, but in practice it is). The *kept* fraction of neurons is 1 at ``t = 0``
  (no exact zeros) and falls with ``t``.
  For a target CETT, each layer gets its own threshold, found by bisection on calibration tokens.
  **PPL-p% sparsity**: a bisection over the shared CETT target finds the point where dropping the
  neurons (in a real forward pass, at every token) raises perplexity by ``p``% (p = 1 by default);
  the sparsity is the fraction of activations dropped there.
- **Temporal sparsity** (delta networks): the fraction of elements of ``x_t - x_{t-1}`` (consecutive
  tokens, both counted) with ``|x_t,j - x_{t-1},j| <= tau * mean_k |x_t,k|``, for the MLP activation
  and for the residual stream (block output); ``tau`` = 0.1 by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.common import (
    TokenBatch,
    activation_name,
    down_matrix,
    is_relu_like,
    next_token_nll,
    run_decoder,
    token_batches,
    tokenize,
)
from residlab.analyses.means import LayerMeans, mean
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.core.types import Log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.interventions.edit import EditFn
    from residlab.models.lm import LanguageModel


# --------------------------------------------------------------------------------------------- CETT


class CETTCurve:
    """CETT of one layer as a function of the threshold ``t``, on calibration activations.

    ``acts`` [tokens, d_mlp] are MLP hidden activations, ``down`` [d_model, d_mlp] the down-projection
    (column i = neuron i's output direction). Tokens whose MLP output is exactly 0 are left out.
    """

    def __init__(self, acts: torch.Tensor, down: torch.Tensor, grid: int = 16) -> None:
        self.acts = acts.float()
        self.down_t = down.float().T.contiguous()  # [d_mlp, d_model]
        self.column_norms = down.float().norm(dim=0)
        self.norms = self.acts.abs() * self.column_norms  # neuron output norms n_i, [tokens, d_mlp]
        full = (self.acts @ self.down_t).norm(dim=-1)
        keep = full > 0
        self.acts, self.norms, self.full = self.acts[keep], self.norms[keep], full[keep]
        if self.acts.shape[0] == 0:
            raise ResidlabError("no calibration token has a nonzero MLP output.", hint="pass more or longer texts.")
        self.max_norm = float(self.norms.max())
        flat = self.norms.flatten().sort().values
        index = torch.linspace(0, flat.numel() - 1, grid + 1).round().long()
        self._grid = sorted({0.0, *flat[index].tolist(), self.max_norm})
        self._cache: dict[float, float] = {}

    def cett(self, t: float) -> float:
        """Mean over tokens of ||W_down a_dropped|| / ||W_down a||, dropping neurons with n_i <= t."""
        t = float(t)
        if t not in self._cache:
            dropped = self.acts * (self.norms <= t)
            self._cache[t] = float(((dropped @ self.down_t).norm(dim=-1) / self.full).mean())
        return self._cache[t]

    def dropped_fraction(self, t: float) -> float:
        """Fraction of (token, neuron) activations with n_i <= t."""
        return float((self.norms <= t).float().mean())

    def threshold_for(self, target: float, tol: float = 2e-3, max_steps: int = 30) -> float:
        """The threshold ``t`` whose CETT is ``target`` (within ``tol``), by bisection.

        A grid of thresholds at quantiles of the neuron norms brackets the target first. Where CETT
        jumps over the target, the side of the jump closer to it is returned.
        """
        if target <= self.cett(0.0):
            return 0.0
        if target >= 1.0:
            return self.max_norm
        lo, hi = 0.0, self.max_norm
        for t in self._grid:  # tightest bracket on the quantile grid
            if self.cett(t) < target:
                lo = max(lo, t)
            else:
                hi = t
                break
        for _ in range(max_steps):
            mid = 0.5 * (lo + hi)
            value = self.cett(mid)
            if abs(value - target) <= tol:
                return mid
            if value < target:
                lo = mid
            else:
                hi = mid
        # not within tol (CETT jumps where a large neuron is dropped): the bracket end closest to the target
        return lo if abs(self.cett(lo) - target) <= abs(self.cett(hi) - target) else hi

    def curve(self) -> list[tuple[float, float, float]]:
        """(threshold, dropped fraction, CETT) at the quantile grid."""
        return [(t, self.dropped_fraction(t), self.cett(t)) for t in self._grid]


def cett(acts: torch.Tensor, down: torch.Tensor, t: float) -> float:
    """CETT of activations ``acts`` [tokens, d_mlp] through ``down`` [d_model, d_mlp] at threshold ``t``."""
    return CETTCurve(acts, down, grid=1).cett(t)


@dataclass
class Bisection:
    """Result of :func:`bisect_increasing`: the last point tried and how the search went."""

    x: float
    value: float
    converged: bool
    trace: list[tuple[float, float]]


def bisect_increasing(
    f: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    tol: float,
    x_tol: float = 1e-4,
    max_steps: int = 12,
) -> Bisection:
    """Find ``x`` in [lo, hi] with ``|f(x) - target| <= tol`` for an increasing ``f``, by bisection.

    Stops when within ``tol`` (converged), when the bracket is narrower than ``x_tol`` or after
    ``max_steps`` evaluations (not converged: ``x`` is then the largest point tried with ``f(x) <=
    target``, or ``lo`` if there is none).
    """
    trace: list[tuple[float, float]] = []
    best_x, best_v = lo, float("nan")
    for _ in range(max_steps):
        if hi - lo < x_tol:
            break
        mid = 0.5 * (lo + hi)
        value = f(mid)
        trace.append((mid, value))
        if abs(value - target) <= tol:
            return Bisection(mid, value, True, trace)
        if value < target:
            lo = mid
            if mid >= best_x:
                best_x, best_v = mid, value
        else:
            hi = mid
    return Bisection(best_x, best_v, False, trace)


# --------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class SparsityResult(AnalysisResult):
    """Per-layer sparsity numbers (index = layer) and the PPL-p% search."""

    json_file: ClassVar[str] = "sparsity.json"

    model: str
    family: str
    activation: str
    relu_like: bool
    num_layers: int
    num_texts: int
    num_tokens: int
    first_position: int
    threshold: float  # |a| > threshold counts as "nonzero" in nonzero_above
    nonzero_exact: list[float]  # fraction with a != 0
    nonzero_above: list[float]  # fraction with |a| > threshold
    temporal_tau: float
    temporal_mlp: list[float]  # fraction of near-zero consecutive-token deltas of the MLP activation
    temporal_residual: list[float]  # same for the residual stream (block output)
    calibration_tokens: int
    cett_targets: list[float]
    cett_thresholds: dict[str, list[float]]  # target -> per-layer threshold
    cett_sparsity: dict[str, list[float]]  # target -> per-layer dropped fraction (calibration tokens)
    cett_curves: list[list[tuple[float, float, float]]]  # per layer: (threshold, dropped, CETT)
    ppl_percent: float
    baseline_ppl: float
    ppl_cett: float  # the shared CETT found by the search
    ppl_increase_percent: float  # the increase measured there
    ppl_converged: bool
    ppl_thresholds: list[float]
    ppl_layer_sparsity: list[float]  # dropped fraction per layer in the real forward pass
    ppl_sparsity: float  # dropped fraction over all layers: the "PPL-p% sparsity"
    ppl_search: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means over layers and the PPL-p% point."""
        return {
            "mean_nonzero_exact": mean(self.nonzero_exact),
            "mean_nonzero_above": mean(self.nonzero_above),
            f"ppl_{self.ppl_percent:g}pct_sparsity": self.ppl_sparsity,
            "ppl_cett": self.ppl_cett,
            "ppl_increase_percent": self.ppl_increase_percent,
            "ppl_converged": self.ppl_converged,
            "mean_temporal_mlp": mean(self.temporal_mlp),
            "mean_temporal_residual": mean(self.temporal_residual),
        }

    @figure("sparsity_nonzero.png")
    def _nonzero_figure(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(layers, [100 * v for v in self.nonzero_exact], "o-", ms=3, label="a != 0")
        ax.plot(layers, [100 * v for v in self.nonzero_above], "s-", ms=3, label=f"|a| > {self.threshold:g}")
        ax.plot(
            layers,
            [100 * (1 - v) for v in self.ppl_layer_sparsity],
            "^-",
            ms=3,
            label=f"kept at PPL+{self.ppl_percent:g}% (CETT {self.ppl_cett:.3f})",
        )
        ax.set_xlabel("layer")
        ax.set_ylabel("% of MLP activations")
        ax.set_ylim(0, 102)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title(f"{self.model} ({self.activation}): active MLP neurons per layer", fontsize=10)
        return fig

    @figure("sparsity_cett.png")
    def _cett_figure(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
        cmap = plt.get_cmap("viridis")
        for layer, curve in enumerate(self.cett_curves):
            ax1.plot(
                [100 * c[1] for c in curve],
                [c[2] for c in curve],
                color=cmap(layer / max(1, self.num_layers - 1)),
                lw=1,
                label=f"layer {layer}" if layer in (0, self.num_layers - 1) else None,
            )
        ax1.set_xlabel("% of activations dropped (n_i <= t)")
        ax1.set_ylabel("CETT (relative error of the MLP output)")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        ax1.set_title("CETT vs sparsity per layer (colour = depth)", fontsize=10)
        for target in self.cett_targets:
            ax2.plot(layers, [100 * v for v in self.cett_sparsity[f"{target:g}"]], "o-", ms=3, label=f"CETT {target:g}")
        ax2.plot(
            layers, [100 * v for v in self.ppl_layer_sparsity], "k^-", ms=3, label=f"PPL+{self.ppl_percent:g}% point"
        )
        ax2.set_xlabel("layer")
        ax2.set_ylabel("% of activations dropped")
        ax2.set_ylim(0, 102)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        ax2.set_title(f"PPL-{self.ppl_percent:g}% sparsity = {100 * self.ppl_sparsity:.1f}%", fontsize=10)
        return fig

    @figure("sparsity_temporal.png")
    def _temporal_figure(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(layers, [100 * v for v in self.temporal_mlp], "o-", ms=3, label="MLP activation")
        ax.plot(layers, [100 * v for v in self.temporal_residual], "s-", ms=3, label="residual stream")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"% of |x_t - x_t-1| <= {self.temporal_tau:g} mean|x_t|")
        ax.set_ylim(0, 102)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title(f"{self.model}: temporal sparsity", fontsize=10)
        return fig


# --------------------------------------------------------------------------------------------- analysis


def _temporal(x: torch.Tensor, valid: torch.Tensor, tau: float) -> tuple[float, int]:
    """Near-zero elements of consecutive-token deltas (both tokens valid): (count, number of elements)."""
    pairs = valid[:, 1:] & valid[:, :-1]
    cur, prev = x[:, 1:][pairs].float(), x[:, :-1][pairs].float()
    if cur.numel() == 0:
        return 0.0, 0
    scale = cur.abs().mean(dim=-1, keepdim=True)
    return float(((cur - prev).abs() <= tau * scale).sum()), cur.numel()


def _perplexity(lm: LanguageModel, batches: list[TokenBatch]) -> float:
    nll = torch.cat([next_token_nll(lm, tb, run_decoder(lm, tb)) for tb in batches])
    return math.exp(float(nll.mean()))


def _calibration_keys(
    rows: list[list[int]], first_position: int, calibration_tokens: int, seed: int
) -> set[tuple[int, int]]:
    """A fixed random subset of all (row, position) pairs at positions >= ``first_position``."""
    valid_keys = [(r, p) for r, row in enumerate(rows) for p in range(first_position, len(row))]
    if not valid_keys:
        raise ResidlabError(
            f"no token at position >= {first_position} in any text: nothing to measure.",
            hint="pass longer texts (or a larger --max-tokens).",
        )
    generator = torch.Generator().manual_seed(seed)
    return {valid_keys[i] for i in torch.randperm(len(valid_keys), generator=generator)[:calibration_tokens].tolist()}


@dataclass
class _Counts:
    """What the recording pass of :func:`analyze_sparsity` measures."""

    exact: LayerMeans
    above: LayerMeans
    temporal_mlp: LayerMeans
    temporal_residual: LayerMeans
    calibration: dict[int, list[torch.Tensor]]  # per layer: the calibration tokens' activations
    baseline_ppl: float
    num_tokens: int


@torch.inference_mode()
def _record_counts(
    lm: LanguageModel,
    rows: list[list[int]],
    batches: list[TokenBatch],
    chosen: set[tuple[int, int]],
    first_position: int,
    threshold: float,
    temporal_tau: float,
    log: Log,
) -> _Counts:
    """One recorded pass over ``batches``: nonzero and temporal counts, calibration activations, perplexity."""
    layers = list(range(lm.num_layers))
    n = lm.num_layers
    counts = _Counts(
        LayerMeans(n), LayerMeans(n), LayerMeans(n), LayerMeans(n), {layer: [] for layer in layers}, 0.0, 0
    )
    nll = []
    for tb in batches:
        valid = tb.valid(first_position)
        counts.num_tokens += int(valid.sum())
        positions = tb.positions
        pick = torch.zeros_like(valid)
        for j, r in enumerate(tb.rows):
            for p in range(len(rows[r])):
                if (r, p) in chosen:
                    pick[j] = pick[j] | (positions[j] == p)
        with lm.record(layers, positions="all", sites=("mlp_act", "block")) as rec:
            normed = run_decoder(lm, tb)
        nll.append(next_token_nll(lm, tb, normed))
        for layer in layers:
            act = rec[layer, "mlp_act"]
            values = act[valid]
            counts.exact.add(layer, values != 0)
            counts.above.add(layer, values.abs() > threshold)
            counts.temporal_mlp.add_sum(layer, *_temporal(act, valid, temporal_tau))
            counts.temporal_residual.add_sum(layer, *_temporal(rec[layer, "block"], valid, temporal_tau))
            counts.calibration[layer].append(act[pick].float())
        del rec
        log(f"recorded a batch of {len(tb.rows)} texts")
    counts.baseline_ppl = math.exp(float(torch.cat(nll).mean()))
    return counts


@torch.inference_mode()
def _perplexity_dropping(
    lm: LanguageModel, curves: list[CETTCurve], batches: list[TokenBatch], target: float, first_position: int
) -> tuple[float, list[float], list[float]]:
    """Perplexity with every neuron whose output norm is at most its layer's threshold for CETT ``target``
    dropped (at every token); return it, the thresholds and the dropped fraction per layer."""
    layers = list(range(lm.num_layers))
    thresholds = [curve.threshold_for(target) for curve in curves]
    dropped = LayerMeans(lm.num_layers)

    def make(layer: int) -> EditFn:
        t, norms = thresholds[layer], curves[layer].column_norms.to(lm.device)

        def fn(value: torch.Tensor, ctx: Any) -> torch.Tensor:
            drop = value.float().abs() * norms <= t
            ok = ctx.positions >= first_position
            dropped.add(layer, drop[ok])
            return value.masked_fill(drop, 0)

        return fn

    with lm.edit(layers, "mlp_act", {layer: make(layer) for layer in layers}):
        ppl = _perplexity(lm, batches)
    return ppl, thresholds, dropped.means()


@torch.inference_mode()
def _check_options(
    ppl_percent: float, threshold: float, temporal_tau: float, calibration_tokens: int, cett_targets: Sequence[float]
) -> None:
    if ppl_percent <= 0:
        raise ResidlabError(f"ppl_percent must be positive, got {ppl_percent}.", hint="pass --ppl-percent 1.")
    if threshold < 0 or temporal_tau < 0:
        raise ResidlabError("thresholds must be >= 0.", hint="pass --threshold / --temporal-tau of 0 or more.")
    if calibration_tokens < 1:
        raise ResidlabError("calibration_tokens must be at least 1.", hint="pass --calibration-tokens 64 or more.")
    if any(not 0 <= t <= 1 for t in cett_targets):
        raise ResidlabError("CETT targets lie in [0, 1].", hint="pass values such as 0.1,0.2,0.3.")


def _ppl_search(
    lm: LanguageModel,
    curves: list[CETTCurve],
    batches: list[TokenBatch],
    baseline_ppl: float,
    first_position: int,
    ppl_percent: float,
    ppl_tolerance: float,
    max_search_steps: int,
    log: Log,
) -> tuple[Bisection, tuple[float, list[float], list[float]], list[dict[str, float]]]:
    """Bisect the CETT whose perplexity increase is ``ppl_percent``: (the point found, its (perplexity,
    thresholds, per-layer dropped fractions), every point tried)."""
    search: list[dict[str, float]] = []
    results: dict[float, tuple[float, list[float], list[float]]] = {}

    def increase(target: float) -> float:
        ppl, _, fractions = results[target] = _perplexity_dropping(lm, curves, batches, target, first_position)
        pct = 100 * (ppl / baseline_ppl - 1)
        overall = mean(fractions)
        search.append({"cett": target, "ppl": ppl, "increase_percent": pct, "sparsity": overall})
        log(f"CETT {target:.4f}: perplexity {ppl:.3f} ({pct:+.2f}%), {100 * overall:.1f}% dropped")
        return pct

    found = bisect_increasing(
        increase, ppl_percent, 0.0, 1.0, tol=ppl_tolerance * ppl_percent, max_steps=max_search_steps
    )
    if found.x not in results:  # nothing under the target was tried: report CETT 0 (exact zeros only)
        increase(found.x)
    return found, results[found.x], search


def analyze_sparsity(
    lm: LanguageModel,
    texts: Sequence[str],
    *,
    max_tokens: int | None = 128,
    batch_size: int = 8,
    first_position: int = 1,
    threshold: float = 0.01,
    temporal_tau: float = 0.1,
    cett_targets: Sequence[float] = (0.1, 0.2, 0.3),
    ppl_percent: float = 1.0,
    ppl_tolerance: float = 0.1,
    max_search_steps: int = 10,
    calibration_tokens: int = 256,
    seed: int = 0,
    log: Log | None = None,
) -> SparsityResult:
    """Lazy-neuron, CETT / PPL-p% and temporal sparsity of ``lm`` on ``texts`` (see the module docstring).

    The PPL search stops when the perplexity increase is within ``ppl_tolerance * ppl_percent``
    percentage points of ``ppl_percent`` (or after ``max_search_steps`` forward passes; then
    ``ppl_converged`` is False and the largest CETT found below the target is reported).
    """
    log = log or (lambda message: None)
    _check_options(ppl_percent, threshold, temporal_tau, calibration_tokens, cett_targets)
    rows = tokenize(lm, texts, max_tokens)
    batches = list(token_batches(lm, rows, batch_size))
    chosen = _calibration_keys(rows, first_position, calibration_tokens, seed)
    counts = _record_counts(lm, rows, batches, chosen, first_position, threshold, temporal_tau, log)
    baseline_ppl = counts.baseline_ppl

    log(f"baseline perplexity {baseline_ppl:.3f}; building CETT curves on {len(chosen)} tokens")
    curves = [CETTCurve(torch.cat(acts), down_matrix(lm, layer)) for layer, acts in counts.calibration.items()]
    counts.calibration.clear()
    cett_thresholds = {f"{c:g}": [curve.threshold_for(c) for curve in curves] for c in cett_targets}
    cett_sparsity = {
        key: [curve.dropped_fraction(t) for curve, t in zip(curves, ts, strict=True)]
        for key, ts in cett_thresholds.items()
    }

    found, (ppl, thresholds, fractions), search = _ppl_search(
        lm, curves, batches, baseline_ppl, first_position, ppl_percent, ppl_tolerance, max_search_steps, log
    )
    return SparsityResult(
        model=lm.name,
        family=lm.arch.family,
        activation=activation_name(lm),
        relu_like=is_relu_like(lm),
        num_layers=lm.num_layers,
        num_texts=len(rows),
        num_tokens=counts.num_tokens,
        first_position=first_position,
        threshold=threshold,
        nonzero_exact=counts.exact.means(),
        nonzero_above=counts.above.means(),
        temporal_tau=temporal_tau,
        temporal_mlp=counts.temporal_mlp.means(),
        temporal_residual=counts.temporal_residual.means(),
        calibration_tokens=len(chosen),
        cett_targets=[float(c) for c in cett_targets],
        cett_thresholds=cett_thresholds,
        cett_sparsity=cett_sparsity,
        cett_curves=[curve.curve() for curve in curves],
        ppl_percent=ppl_percent,
        baseline_ppl=baseline_ppl,
        ppl_cett=found.x,
        ppl_increase_percent=100 * (ppl / baseline_ppl - 1),
        ppl_converged=found.converged,
        ppl_thresholds=thresholds,
        ppl_layer_sparsity=fractions,
        ppl_sparsity=mean(fractions),
        ppl_search=search,
    )
