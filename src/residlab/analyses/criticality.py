"""Criticality (Roberts, Yaida & Hanin, "The Principles of Deep Learning Theory"): how signals scale with
depth in the trained model and in the same architecture freshly initialised.

A network is *critical* when the preactivation statistics neither explode nor vanish with depth and
a small perturbation of the input neither dies out nor blows up (parallel susceptibility ~ 1). For
each model, per layer ``l`` and averaged over real tokens at positions >= ``first_position``:

- ``preact_second_moment``: mean of ``z^2`` over the MLP's pre-activation units (site ``mlp_pre``,
  the gate's output in a gated MLP): the layer's preactivation variance ``G^(l)`` (zero-mean at init).
- ``preact_variance``: the variance of ``z`` across units, per token (the mean removed).
- ``residual_rms``: ``||h_{l+1}|| / sqrt(d)`` of the block output, and ``growth`` = ``||h_{l+1}|| / ||h_l||``.
- ``perturbation_gain``: a random perturbation of relative size ``eps`` is added to the residual
  entering block 0 at every measured token; ``(||dh_{l+1}|| / ||h_{l+1}||) / eps``, 1 = neither amplified
  nor damped relative to the signal.

The fresh model is ``AutoModelForCausalLM.from_config(config)`` after ``torch.manual_seed(seed)``:
the family's own initialisation (normal with the config's ``initializer_range``, norms at 1). Packaged
models are converted from GGUF files, which do not record ``initializer_range``, so their configs carry
transformers' default (0.02; SmolLM2's original config says 0.0417, Qwen2.5's 0.02).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.common import TokenBatch, run_decoder, token_batches, tokenize
from residlab.analyses.means import LayerMeans
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.core.types import Log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel

_STATS = ("preact_second_moment", "preact_variance", "residual_rms", "growth", "perturbation_gain")


@dataclass(frozen=True)
class DepthProfile:
    """One model's per-layer statistics (index = layer)."""

    preact_second_moment: list[float]
    preact_variance: list[float]
    residual_rms: list[float]
    growth: list[float]
    perturbation_gain: list[float]

    def headline(self) -> dict[str, float]:
        """Per-layer factors fitted over layers 1..L-1 (geometric), and the last layer's perturbation gain."""
        return {
            "preact_factor_per_layer": _fitted_factor(self.preact_second_moment[1:]),
            "residual_rms_factor_per_layer": _fitted_factor(self.residual_rms[1:]),
            "residual_rms_power_law_exponent": _power_law_exponent(self.residual_rms),
            "preact_last_over_first": self.preact_second_moment[-1] / self.preact_second_moment[0],
            "residual_rms_last_over_first": self.residual_rms[-1] / self.residual_rms[0],
            "perturbation_gain_last": self.perturbation_gain[-1],
        }


def _fitted_factor(values: Sequence[float]) -> float:
    """``exp(slope)`` of a least-squares line through ``log values`` (one step = one layer)."""
    points = [(i, math.log(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return math.exp(sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points))


def _power_law_exponent(values: Sequence[float]) -> float:
    """Slope of ``log value`` against ``log (layer + 1)`` (0.5: sqrt(depth) growth, a pre-norm residual at init)."""
    points = [(math.log(i + 1), math.log(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


@dataclass(frozen=True)
class CriticalityResult(AnalysisResult):
    """The trained model's and the freshly initialised architecture's depth profiles, side by side."""

    json_file: ClassVar[str] = "criticality.json"

    model: str
    family: str
    num_layers: int
    num_texts: int
    num_tokens: int
    first_position: int
    seed: int
    eps: float
    initializer_range: float | None
    trained: DepthProfile
    fresh: DepthProfile
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The two profiles' headline factors (``trained_*`` and ``fresh_*``)."""
        out: dict[str, Any] = {}
        for name in ("trained", "fresh"):
            out.update({f"{name}_{k}": v for k, v in getattr(self, name).headline().items()})
        return out

    @figure("criticality.png")
    def _profiles(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
        panels = (
            ("preact_second_moment", "MLP preactivation E[z^2]", True),
            ("residual_rms", "residual RMS ||h_{l+1}|| / sqrt(d)", True),
            ("growth", "norm growth ||h_{l+1}|| / ||h_l||", False),
            ("perturbation_gain", f"perturbation gain (relative, eps = {self.eps:g})", True),
        )
        for ax, (stat, label, log_scale) in zip(axes.flat, panels, strict=True):
            ax.plot(layers, getattr(self.trained, stat), "o-", ms=3, label="trained")
            ax.plot(layers, getattr(self.fresh, stat), "s--", ms=3, label=f"fresh init (seed {self.seed})")
            if log_scale:
                ax.set_yscale("log")
            if stat in ("growth", "perturbation_gain"):
                ax.axhline(1.0, color="k", lw=0.6)
            ax.set_xlabel("layer")
            ax.set_ylabel(label, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{self.model}: criticality, trained vs freshly initialised ({self.num_tokens} tokens)")
        return fig


def fresh_copy(lm: LanguageModel, seed: int = 0, initializer_range: float | None = None) -> LanguageModel:
    """The same architecture (config) as ``lm``, freshly initialised after ``torch.manual_seed(seed)``
    (with ``initializer_range`` in place of the config's, when given)."""
    import copy

    from transformers import AutoModelForCausalLM

    from residlab.models.lm import LanguageModel

    config: Any = copy.deepcopy(lm.model.config)
    if initializer_range is not None:
        if not (initializer_range > 0 and math.isfinite(initializer_range)):
            raise ResidlabError(f"initializer_range must be > 0, got {initializer_range}.", hint="pass e.g. 0.02.")
        config.initializer_range = initializer_range
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=lm.dtype).eval()
    return LanguageModel(model, lm.tokenizer, name=f"{lm.name} (fresh init)", source="from_config")


@torch.inference_mode()
def _profile_batch(
    lm: LanguageModel, tb: TokenBatch, valid: torch.Tensor, eps: float, seed: int, stats: dict[str, LayerMeans]
) -> None:
    layers = list(range(lm.num_layers))
    with lm.record(layers, positions="all", sites=("block_input", "mlp_pre", "block")) as rec:
        run_decoder(lm, tb)
    generator = torch.Generator().manual_seed(seed)
    h0 = rec[0, "block_input"].float()
    noise = torch.randn(h0.shape, generator=generator)
    noise = noise / noise.norm(dim=-1, keepdim=True) * h0.norm(dim=-1, keepdim=True) * eps
    noise = noise * valid.unsqueeze(-1)

    def perturb(value: torch.Tensor, ctx: Any) -> torch.Tensor:
        return value + noise.to(value.dtype)

    with lm.edit(0, "block_input", perturb), lm.record(layers, positions="all", sites=("block",)) as moved:
        run_decoder(lm, tb)
    d = lm.hidden_size
    for layer in layers:
        z = rec[layer, "mlp_pre"].float()[valid]
        h, out = rec[layer, "block_input"].float()[valid], rec[layer, "block"].float()[valid]
        delta = moved[layer, "block"].float()[valid] - out
        out_norm = out.norm(dim=-1)
        stats["preact_second_moment"].add(layer, z.square().mean(-1))
        stats["preact_variance"].add(layer, z.var(-1, unbiased=False))
        stats["residual_rms"].add(layer, out_norm / math.sqrt(d))
        stats["growth"].add(layer, out_norm / h.norm(dim=-1).clamp(min=1e-30))
        stats["perturbation_gain"].add(layer, delta.norm(dim=-1) / out_norm.clamp(min=1e-30) / eps)


def depth_profile(
    lm: LanguageModel, batches: Sequence[TokenBatch], first_position: int, eps: float, seed: int
) -> tuple[DepthProfile, int]:
    """The per-layer statistics of ``lm`` over ``batches`` and how many tokens they averaged."""
    stats = {name: LayerMeans(lm.num_layers) for name in _STATS}
    tokens = 0
    for i, tb in enumerate(batches):
        valid = tb.valid(first_position)
        tokens += int(valid.sum())
        _profile_batch(lm, tb, valid, eps, seed + i, stats)
    return DepthProfile(**{name: s.means() for name, s in stats.items()}), tokens


def analyze_criticality(
    lm: LanguageModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    first_position: int = 1,
    eps: float = 1e-3,
    seed: int = 0,
    fresh: LanguageModel | None = None,
    initializer_range: float | None = None,
    log: Log | None = None,
    progress: bool = True,
) -> CriticalityResult:
    """Depth profiles of ``lm`` and of its architecture freshly initialised (``fresh``, else :func:`fresh_copy`
    with ``initializer_range`` if given)."""
    from tqdm.auto import tqdm

    log = log or (lambda message: None)
    if not (0 < eps < 1) or not math.isfinite(eps):
        raise ResidlabError(f"eps must be in (0, 1), got {eps}.", hint="pass a small relative size such as 1e-3.")
    if first_position < 0:
        raise ResidlabError(f"first_position must be >= 0, got {first_position}.", hint="pass 0 or 1.")
    batches = list(token_batches(lm, tokenize(lm, texts, max_tokens), batch_size))
    bar = tqdm(total=2, unit="model", desc="criticality", disable=not progress)
    trained, tokens = depth_profile(lm, batches, first_position, eps, seed)
    bar.update()
    if tokens == 0:
        raise ResidlabError(f"no token at position >= {first_position}.", hint="pass longer texts.")
    log(f"trained profile done; initialising {lm.name} afresh (seed {seed})")
    initial = fresh if fresh is not None else fresh_copy(lm, seed, initializer_range)
    fresh_profile, _ = depth_profile(initial, batches, first_position, eps, seed)
    bar.update()
    bar.close()
    return CriticalityResult(
        model=lm.name,
        family=lm.arch.family,
        num_layers=lm.num_layers,
        num_texts=len(texts),
        num_tokens=tokens,
        first_position=first_position,
        seed=seed,
        eps=eps,
        initializer_range=getattr(initial.model.config, "initializer_range", None),
        trained=trained,
        fresh=fresh_profile,
        notes=["the fresh model shares the trained model's tokenizer and config; only the weights differ."],
    )
