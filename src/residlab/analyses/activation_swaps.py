"""Swapping the MLP's activation function of a trained model, and what it costs in loss.

Each MLP applies its activation module (the architecture map's ``mlp_act_fn``) to the
pre-activation ``x`` (site ``mlp_pre``: the gate of a gated MLP). :class:`ActivationSwap` replaces
that module's output ``g(x)`` by ``s_l * f(x)`` for a chosen ``f`` and layer scale ``s_l`` (1 unless
calibrated) with a forward hook that exists only inside its ``with`` block; the model is never
changed. The built-in ``f`` (:data:`ACTIVATIONS`):

- ``relu``: ``max(x, 0)``; ``gelu``: ``x Phi(x)`` (exact, erf); ``gelu_tanh``: the tanh approximation;
  ``silu``: ``x sigmoid(x)``;
- ``crrelu``: Correction Regularized ReLU from "A Method on Searching Better Activation Functions"
  (Sun, Wu et al. 2024, arXiv 2405.12954): ``CRReLU(x) = ReLU(x) + eps * x * exp(-x^2 / 2)``, where the
  paper's ``eps`` is a learnable scalar initialised at 0.01; here it is fixed at 0.01 (no training),
  or any value through :func:`crrelu_with`.

Any ``Tensor -> Tensor`` callable works too. For each swap the analysis reports the held-out
cross-entropy change, and per layer the statistics of the new activation next to the original
(mean, standard deviation, the fraction of exact zeros, and the relative deviation
``||f(x) - g(x)|| / ||g(x)||`` on the same pre-activations of the unchanged model).

**Calibration** (optional): per layer one scalar ``s_l = <f(x), g(x)> / <f(x), f(x)>``, the least-squares
fit of the original activation by the scaled new one over the *train* texts' pre-activations (the
unchanged model's); the swapped model is then judged again on the evaluation texts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from residlab.analyses.common import TokenBatch, activation_name, run_decoder
from residlab.analyses.heldout import Loss, batches_of, heldout_loss
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.core.registry import lookup
from residlab.interventions.hooks import HookSet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel

ActivationFn = Callable[[torch.Tensor], torch.Tensor]


def crrelu_with(eps: float) -> ActivationFn:
    """CRReLU with a fixed ``eps``: ``relu(x) + eps * x * exp(-x^2 / 2)``."""

    def crrelu(x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) + eps * x * torch.exp(-x * x / 2)

    return crrelu


ACTIVATIONS: dict[str, ActivationFn] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "crrelu": crrelu_with(0.01),
}


def resolve_activation(key: str | ActivationFn) -> tuple[str, ActivationFn]:
    """The (name, function) of a built-in name or a callable."""
    fn = lookup(ACTIVATIONS, key, what="activation", extend_hint="pass any Tensor -> Tensor callable")
    name = key if isinstance(key, str) else getattr(key, "__name__", type(key).__name__)
    return name, fn


def activation_modules(lm: LanguageModel, layers: Iterable[int]) -> dict[int, torch.nn.Module]:
    """Each layer's MLP activation module; an error if the family maps none or layers share one."""
    if not lm.arch.mlp_act_fn:
        raise ResidlabError(
            f"the architecture map of {lm.name} names no MLP activation module (mlp_act_fn).",
            hint="use a mapped family (llama, qwen2, gemma3, gpt2, gpt_neox, ...).",
        )
    modules = {lm.check_layer(layer): lm.block_part(layer, "mlp_act_fn") for layer in layers}
    if len({id(m) for m in modules.values()}) < len(modules):
        raise ResidlabError(
            "several layers share one activation module, so one layer's activation cannot be swapped alone.",
            hint="report this model; residlab expects one activation module per MLP.",
        )
    return modules


class ActivationSwap:
    """A context manager: inside it, layer ``l``'s MLP activation computes ``scales[l] * fn(x)``."""

    def __init__(
        self, lm: LanguageModel, fn: ActivationFn, layers: Iterable[int], scales: Mapping[int, float] | None = None
    ) -> None:
        self.modules = activation_modules(lm, layers)
        self.fn = fn
        self.scales = {layer: float(scales[layer]) if scales else 1.0 for layer in self.modules}
        self._hooks = HookSet()

    def _hook(self, layer: int) -> Callable[..., torch.Tensor]:
        scale = self.scales[layer]

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return (self.fn(args[0].float()) * scale).to(output.dtype)

        return hook

    def __enter__(self) -> ActivationSwap:
        try:
            for layer, module in self.modules.items():
                self._hooks.forward(module, self._hook(layer))
        except BaseException:
            self._hooks.remove_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove_all()


# --------------------------------------------------------------------------------------------- statistics


class _Moments:
    """Per-layer running sums over the observed activations (float64)."""

    def __init__(self, n: int) -> None:
        self.sums = torch.zeros(n, 6, dtype=torch.float64)  # count, sum, sum sq, zeros, sum (f-g)^2, sum g^2
        self.cross = torch.zeros(n, 2, dtype=torch.float64)  # sum f g, sum f f (calibration)

    def add(self, i: int, new: torch.Tensor, original: torch.Tensor) -> None:
        new, original = new.double(), original.double()
        diff = new - original
        self.sums[i] += torch.stack(
            [
                torch.tensor(float(new.numel()), dtype=torch.float64),
                new.sum(),
                (new * new).sum(),
                (new == 0).sum().double(),
                (diff * diff).sum(),
                (original * original).sum(),
            ]
        )
        self.cross[i] += torch.stack([(new * original).sum(), (new * new).sum()])

    def stats(self) -> dict[str, list[float]]:
        n, s, sq, zeros, dev, ref = self.sums.clamp_min(0).T
        n = n.clamp_min(1)
        meanv = s / n
        return {
            "mean": meanv.tolist(),
            "std": (sq / n - meanv**2).clamp_min(0).sqrt().tolist(),
            "zero_fraction": (zeros / n).tolist(),
            "rel_deviation": (dev.sqrt() / ref.sqrt().clamp_min(1e-30)).tolist(),
        }

    def scales(self) -> list[float]:
        fg, ff = self.cross.T
        return torch.where(ff > 0, fg / ff.clamp_min(1e-30), torch.ones_like(ff)).tolist()


@torch.inference_mode()
def observe_activations(
    lm: LanguageModel,
    batches: Sequence[TokenBatch],
    candidates: Mapping[str, ActivationFn],
    layers: Sequence[int],
    *,
    first_position: int = 1,
    desc: str = "activation statistics",
    progress: bool = True,
) -> tuple[_Moments, _Moments, dict[str, _Moments]]:
    """One pass of the unchanged model: moments of the pre-activation, of the original activation and
    of every candidate applied to the same pre-activations (tokens at positions >= ``first_position``)."""
    from tqdm.auto import tqdm

    modules = activation_modules(lm, layers)
    pre, orig = _Moments(len(layers)), _Moments(len(layers))
    cands = {name: _Moments(len(layers)) for name in candidates}
    state: dict[str, torch.Tensor] = {}

    def make(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            keep = state["mask"]
            x, g = args[0][keep].float(), output[keep].float()
            pre.add(i, x, x)
            orig.add(i, g, g)
            for name, fn in candidates.items():
                cands[name].add(i, fn(x), g)

        return hook

    hooks = HookSet()
    try:
        for i, layer in enumerate(layers):
            hooks.forward(modules[layer], make(i))
        for tb in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            state["mask"] = tb.valid(first_position)
            run_decoder(lm, tb)
    finally:
        hooks.remove_all()
    return pre, orig, cands


# --------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class SwapOutcome:
    """One activation swapped in at every chosen layer: held-out loss and per-layer statistics."""

    name: str
    ce: float
    delta_ce: float  # ce - the unchanged model's ce (nats per token)
    perplexity: float
    mean: list[float]  # of f(x) on the unchanged model's pre-activations, per layer
    std: list[float]
    zero_fraction: list[float]
    rel_deviation: list[float]  # ||f(x) - g(x)|| / ||g(x)||
    scales: list[float] | None = None  # calibrated s_l (train texts), when calibrated
    calibrated_ce: float | None = None
    calibrated_delta_ce: float | None = None


@dataclass(frozen=True)
class ActivationsResult(AnalysisResult):
    """The unchanged model's loss and activation statistics, and one :class:`SwapOutcome` per swap."""

    json_file: ClassVar[str] = "activations.json"

    model: str
    family: str
    activation: str  # the model's own, as its config names it
    layers: list[int]
    eval_texts: int
    eval_tokens: int  # next-token predictions in the loss
    train_texts: int  # used for calibration only (0 when not calibrated)
    first_position: int
    baseline_ce: float
    baseline_perplexity: float
    pre_mean: list[float]
    pre_std: list[float]
    original_mean: list[float]
    original_std: list[float]
    original_zero_fraction: list[float]
    swaps: list[SwapOutcome]
    curve_x: list[float] = field(default_factory=list)  # the functions themselves, for the figure
    curves: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Loss change per swap (raw and calibrated) and the mean relative deviation over layers."""
        out: dict[str, Any] = {"baseline_ce": self.baseline_ce, "baseline_perplexity": self.baseline_perplexity}
        for s in self.swaps:
            out[f"{s.name}_delta_ce"] = s.delta_ce
            out[f"{s.name}_mean_rel_deviation"] = sum(s.rel_deviation) / max(1, len(s.rel_deviation))
            if s.calibrated_delta_ce is not None:
                out[f"{s.name}_calibrated_delta_ce"] = s.calibrated_delta_ce
        return out

    @figure("activations_loss.png")
    def _loss_figure(self, plt: Any) -> Figure:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
        names = [s.name for s in self.swaps]
        ax1.bar(range(len(names)), [s.delta_ce for s in self.swaps], width=0.4, label="swapped")
        calibrated = [s.calibrated_delta_ce for s in self.swaps]
        if any(c is not None for c in calibrated):
            xs = [i + 0.4 for i, c in enumerate(calibrated) if c is not None]
            ax1.bar(xs, [c for c in calibrated if c is not None], width=0.4, label="swapped + per-layer scale")
        ax1.set_xticks(range(len(names)), names)
        ax1.set_yscale("symlog", linthresh=0.01)
        ax1.set_ylabel("held-out CE change (nats / token)")
        ax1.axhline(0, color="k", lw=0.6)
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3, axis="y")
        ax1.set_title(f"baseline CE {self.baseline_ce:.3f} ({self.eval_tokens} tokens)", fontsize=10)
        for name, ys in self.curves.items():
            ax2.plot(self.curve_x, ys, lw=2.2 if name == "original" else 1.2, label=name)
        ax2.set_xlabel("pre-activation x")
        ax2.set_ylabel("f(x)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
        ax2.set_title(f"the functions (the model's own: {self.activation})", fontsize=10)
        fig.suptitle(f"{self.model}: MLP activation swapped at layers {_span(self.layers)}", fontsize=10)
        return fig

    @figure("activations_stats.png")
    def _stats_figure(self, plt: Any) -> Figure:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
        ax1.plot(self.layers, self.original_std, "k-", lw=2, label="original: std")
        for s in self.swaps:
            ax1.plot(self.layers, s.std, "-", lw=1, label=f"{s.name}: std")
            ax2.plot(self.layers, s.rel_deviation, "o-", ms=3, label=s.name)
        ax1.set_xlabel("layer")
        ax1.set_ylabel("std of the activation output")
        ax1.set_yscale("log")
        ax1.legend(fontsize=7)
        ax1.grid(alpha=0.3)
        ax2.set_xlabel("layer")
        ax2.set_ylabel("||f(x) - g(x)|| / ||g(x)||")
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        ax2.set_title("distance from the original on the same pre-activations", fontsize=10)
        return fig


def _span(layers: Sequence[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# --------------------------------------------------------------------------------------------- analysis


def _function_curves(
    lm: LanguageModel, layer: int, candidates: Mapping[str, ActivationFn]
) -> tuple[list[float], dict[str, list[float]]]:
    x = torch.linspace(-4, 4, 161)
    module = lm.block_part(layer, "mlp_act_fn")
    with torch.inference_mode():
        curves = {"original": module(x.to(lm.dtype)).float().tolist()}
        curves.update({name: fn(x).tolist() for name, fn in candidates.items()})
    return x.tolist(), curves


def analyze_activations(
    lm: LanguageModel,
    eval_texts: Sequence[str],
    train_texts: Sequence[str] = (),
    *,
    activations: Sequence[str | ActivationFn] = ("relu", "gelu", "silu", "crrelu"),
    layers: Sequence[int] | None = None,
    calibrate: bool = False,
    max_tokens: int = 128,
    batch_size: int = 8,
    first_position: int = 1,
    progress: bool = True,
) -> ActivationsResult:
    """Swap the MLP activation for each of ``activations`` at ``layers`` (all by default) and measure
    the held-out loss on ``eval_texts`` (see the module docstring). With ``calibrate``, fit one scale
    per layer on ``train_texts`` and measure again."""
    chosen = sorted({lm.check_layer(x) for x in layers}) if layers else list(range(lm.num_layers))
    candidates = dict(resolve_activation(a) for a in activations)
    if not candidates:
        raise ResidlabError("no activation to swap in.", hint="pass e.g. relu,gelu,silu,crrelu.")
    if calibrate and not train_texts:
        raise ResidlabError("calibration needs train texts.", hint="pass train texts (or leave calibration off).")
    activation_modules(lm, chosen)
    batches = batches_of(lm, eval_texts, max_tokens, batch_size)
    baseline = heldout_loss(lm, batches, desc="baseline loss", progress=progress)
    pre, orig, stats = observe_activations(
        lm, batches, candidates, chosen, first_position=first_position, progress=progress
    )
    scales: dict[str, list[float]] = {}
    if calibrate:
        train = batches_of(lm, train_texts, max_tokens, batch_size)
        _, _, fitted = observe_activations(
            lm, train, candidates, chosen, first_position=first_position, desc="calibration", progress=progress
        )
        scales = {name: moments.scales() for name, moments in fitted.items()}
    outcomes = [
        _swap_outcome(lm, name, fn, chosen, batches, baseline, stats[name], scales.get(name), progress)
        for name, fn in candidates.items()
    ]
    pre_stats, orig_stats = pre.stats(), orig.stats()
    curve_x, curves = _function_curves(lm, chosen[0], candidates)
    return ActivationsResult(
        model=lm.name,
        family=lm.arch.family,
        activation=activation_name(lm),
        layers=chosen,
        eval_texts=len(eval_texts),
        eval_tokens=baseline.tokens,
        train_texts=len(train_texts) if calibrate else 0,
        first_position=first_position,
        baseline_ce=baseline.ce,
        baseline_perplexity=baseline.perplexity,
        pre_mean=pre_stats["mean"],
        pre_std=pre_stats["std"],
        original_mean=orig_stats["mean"],
        original_std=orig_stats["std"],
        original_zero_fraction=orig_stats["zero_fraction"],
        swaps=outcomes,
        curve_x=curve_x,
        curves=curves,
    )


def _swap_outcome(
    lm: LanguageModel,
    name: str,
    fn: ActivationFn,
    layers: list[int],
    batches: list[TokenBatch],
    baseline: Loss,
    moments: _Moments,
    scales: list[float] | None,
    progress: bool,
) -> SwapOutcome:
    with ActivationSwap(lm, fn, layers):
        loss = heldout_loss(lm, batches, desc=f"loss with {name}", progress=progress)
    calibrated = None
    if scales is not None:
        with ActivationSwap(lm, fn, layers, dict(zip(layers, scales, strict=True))):
            calibrated = heldout_loss(lm, batches, desc=f"loss with {name} (scaled)", progress=progress)
    s = moments.stats()
    return SwapOutcome(
        name=name,
        ce=loss.ce,
        delta_ce=loss.ce - baseline.ce,
        perplexity=loss.perplexity,
        mean=s["mean"],
        std=s["std"],
        zero_fraction=s["zero_fraction"],
        rel_deviation=s["rel_deviation"],
        scales=scales,
        calibrated_ce=calibrated.ce if calibrated else None,
        calibrated_delta_ce=calibrated.ce - baseline.ce if calibrated else None,
    )
