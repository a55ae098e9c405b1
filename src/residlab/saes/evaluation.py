"""How good an SAE is: reconstruction (both NMSE conventions), sparsity, dead latents, and the LM's
cross-entropy with the reconstruction spliced in.

Reconstruction, pooled over every held-out token (named, because the field uses both):

- ``fve_centred = 1 - sum|x_hat - x|^2 / sum|x - mean(x)|^2`` (variance explained; Gao et al.'s
  normalised MSE is ``nmse_centred = 1 - fve_centred``);
- ``fve_raw = 1 - sum|x_hat - x|^2 / sum|x|^2`` (against the raw second moment, ``nmse_raw``);
- ``nmse_per_token``: the mean over tokens of ``|x_hat - x|^2 / |x|^2`` (the older per-token form).

Downstream: next-token cross-entropy on held-out windows with the site's value replaced (at real,
non-BOS positions, through an interventions ``Edit``) by the reconstruction, by zeros, and by the
training mean; ``ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_original)`` (SAELens'
CE-loss score) and ``delta_lm_loss = CE_sae - CE_original``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.result import AnalysisResult, figure
from residlab.interventions.edit import Edit
from residlab.saes.activations import keep_mask
from residlab.saes.base import SparseAutoencoder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import Batch, LanguageModel


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder, acts: torch.Tensor, *, sample: bool | None = None, batch_size: int = 4096
) -> dict[str, Any]:
    """FVE/NMSE both ways, L0, alive fraction and per-latent firing density over ``acts`` [n, d_in]."""
    sse = sum_sq = per_token = 0.0
    total = torch.zeros(acts.shape[1], dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    l0 = 0.0
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size].float()
        out = sae(x, sample=sample)
        err = (out.x_hat - x).pow(2).sum(-1).double()
        norm = x.pow(2).sum(-1).double()
        sse += float(err.sum())
        sum_sq += float(norm.sum())
        per_token += float((err / norm.clamp_min(1e-12)).sum())
        total += x.double().sum(dim=0)
        active = out.z != 0
        fired += active.double().sum(dim=0)
        l0 += float(active.sum())
    n = acts.shape[0]
    centred = sum_sq - float(total.pow(2).sum()) / n
    density = fired / n
    return {
        "eval_tokens": n,
        "fve_centred": 1 - sse / centred,
        "fve_raw": 1 - sse / sum_sq,
        "nmse_centred": sse / centred,
        "nmse_raw": sse / sum_sq,
        "nmse_per_token": per_token / n,
        "l0": l0 / n,
        "alive_fraction": float((fired > 0).double().mean()),
        "dead_fraction": float((fired == 0).double().mean()),
        "density": density.tolist(),
    }


def next_token_ce(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """Summed next-token cross-entropy over real positions followed by a real token, and their count."""
    mask = batch.attention_mask.bool()
    pairs = mask[:, :-1] & mask[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float(nll[pairs].sum()), int(pairs.sum())


Replacement = Callable[[torch.Tensor], torch.Tensor] | None  # value [b, t, d] -> new value; None = original


@torch.no_grad()
def spliced_ce(
    lm: LanguageModel,
    windows: Sequence[Sequence[int]],
    layer: int,
    site: str,
    replacements: dict[str, Replacement],
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean next-token CE over ``windows`` for each named replacement of the site's value (at real,
    non-BOS positions)."""
    sums = dict.fromkeys(replacements, 0.0)
    count = 0
    for start in range(0, len(windows), batch_size):
        batch = lm.pad(windows[start : start + batch_size])
        keep = keep_mask(lm, batch).unsqueeze(-1)
        n = 0
        for name, replace in replacements.items():
            if replace is None:
                loss, n = next_token_ce(lm.forward(batch), batch)
            else:

                def edit(value: torch.Tensor, ctx: Any, replace: Callable = replace, keep=keep) -> torch.Tensor:
                    return torch.where(keep, replace(value).to(value.dtype), value)

                with Edit(lm, layer, site, edit):
                    loss, n = next_token_ce(lm.forward(batch), batch)
            sums[name] += loss
        count += n
    return {name: total / max(1, count) for name, total in sums.items()}


def downstream_ce(
    lm: LanguageModel,
    sae: SparseAutoencoder,
    windows: Sequence[Sequence[int]],
    mean_activation: torch.Tensor,
    *,
    sample: bool | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """CE original / with the SAE / zero- and mean-ablated, CE loss recovered and delta LM loss."""
    hook = sae.cfg.hook
    mean = mean_activation.to(lm.device)
    torch.manual_seed(seed)  # the vSAE's posterior noise, when sampling
    ce = spliced_ce(
        lm,
        windows,
        hook.layer,
        hook.site,
        {
            "original": None,
            "sae": lambda v: sae.reconstruct(v, sample=sample),
            "zero": torch.zeros_like,
            "mean": lambda v: mean.to(v.dtype).expand_as(v),
        },
        batch_size=batch_size,
    )
    recovered = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["original"])
    return {
        "ce_loss_original": ce["original"],
        "ce_loss_sae": ce["sae"],
        "ce_loss_zero_ablation": ce["zero"],
        "ce_loss_mean_ablation": ce["mean"],
        "ce_loss_recovered": recovered,
        "ce_loss_recovered_vs_mean": (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["original"]),
        "delta_lm_loss": ce["sae"] - ce["original"],
    }


@torch.no_grad()
def topk_jaccard(sae: SparseAutoencoder, acts: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Stability of the selected latents under posterior noise (vSAE): mean Jaccard of the selected
    sets between sampling off and a draw, and between two independent draws."""
    generator = torch.Generator().manual_seed(seed)
    x = acts.float()

    def selected(sample: bool) -> torch.Tensor:
        out = sae(x, sample=sample, generator=generator) if sample else sae(x, sample=False)
        index = out.extra["selected"].abs().topk(sae.cfg.k, dim=-1).indices
        return torch.zeros(out.z.shape, dtype=torch.bool).scatter(-1, index, True)

    def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
        inter = (a & b).sum(-1).double()
        return float((inter / (a | b).sum(-1).double()).mean())

    off, draw1, draw2 = selected(False), selected(True), selected(True)
    return {"jaccard_mean_vs_sample": jaccard(off, draw1), "jaccard_sample_vs_sample": jaccard(draw1, draw2)}


@dataclass(frozen=True)
class SAEEvalResult(AnalysisResult):
    """One SAE evaluated with one sampling setting (``sample`` is None for deterministic SAEs)."""

    json_file: ClassVar[str] = "sae_eval.json"
    model: str
    layer: int
    site: str
    arch: str
    sample: bool | None
    width: int
    k: int
    train_tokens: int
    metrics: dict[str, Any]
    downstream: dict[str, float]
    stability: dict[str, float]
    history: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        keys = ("eval_tokens", "fve_centred", "fve_raw", "nmse_centred", "nmse_raw", "nmse_per_token", "l0")
        return {
            **{k: self.metrics[k] for k in (*keys, "alive_fraction", "dead_fraction") if k in self.metrics},
            **self.downstream,
            **self.stability,
        }

    def row(self) -> dict[str, Any]:
        """The benchmark row's SAE part (see benchmarks/sae.py)."""
        m, d = self.metrics, self.downstream
        return {
            "model": self.model,
            "layer": self.layer,
            "site": self.site,
            "arch": self.arch,
            "sample": self.sample,
            "width": self.width,
            "k": self.k,
            "train_tokens": self.train_tokens,
            "eval_tokens": m["eval_tokens"],
            "fve_centred": m["fve_centred"],
            "fve_raw": m["fve_raw"],
            "nmse": m["nmse_centred"],
            "l0": m["l0"],
            "alive_fraction": m["alive_fraction"],
            **{k: d.get(k) for k in ("ce_loss_original", "ce_loss_sae", "ce_loss_zero_ablation")},
            "ce_loss_recovered": d.get("ce_loss_recovered"),
            "delta_lm_loss": d.get("delta_lm_loss"),
        }

    @figure("latent_density.png")
    def _density(self, plt) -> Figure:
        density = torch.tensor(self.metrics["density"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        alive = density[density > 0]
        if alive.numel():
            ax.hist(alive.log10().numpy(), bins=50, color="tab:blue")
        dead = int((density == 0).sum())
        ax.set_xlabel("log10 firing density (held-out tokens)")
        ax.set_ylabel("latents")
        ax.set_title(f"{self.arch} L{self.layer} {self.site}: {dead} of {density.numel()} latents never fired")
        return fig

    @figure("training_curve.png")
    def _curve(self, plt) -> Figure | None:
        if not self.history:
            return None
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [h["step"] for h in self.history]
        ax.plot(steps, [h["nmse"] for h in self.history], label="NMSE (centred)")
        ax.plot(steps, [h.get("dead", 0.0) for h in self.history], label="dead fraction")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
        return fig
