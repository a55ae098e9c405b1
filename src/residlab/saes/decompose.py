"""A steering vector as SAE latents, and an SAE latent as a steering vector.

Two decompositions of a direction ``v`` at the SAE's layer:

- **encoder read-out**: ``v @ W_enc`` (the pre-activations ``v`` adds, biases left out): which
  latents the vector would switch on if added to the residual stream;
- **non-negative sparse fit**: ``v ~ sum_i c_i W_dec[i]`` with ``c_i >= 0`` and at most ``max_latents``
  non-zero, by non-negative orthogonal matching pursuit (the latent most aligned with the residual
  joins, then the coefficients on the chosen set are refitted by projected gradient).

Each fitted latent's *share* is ``c_i W_dec[i] . v / |v|^2``; the shares add up to the fraction of
``|v|^2`` the fit explains. Given held-out activations, each fitted latent also gets its firing density
and its top-activating contexts (the dashboard's cards), so a reader sees what the latent fires on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.saes.base import SparseAutoencoder
from residlab.saes.dashboard import DashboardOptions, latent_cards
from residlab.saes.latent_lens import latent_lens

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel
    from residlab.saes.activations import ActivationStore
    from residlab.vectors.steering_vector import SteeringVector


def encoder_readout(sae: SparseAutoencoder, direction: torch.Tensor, top: int = 20) -> list[dict[str, float]]:
    """The ``top`` latents with the largest ``|v @ W_enc|``, with that value and the cosine of ``v``
    with their decoder direction."""
    v = direction.float().to(sae.W_enc.device)
    with torch.no_grad():
        readout = v @ sae.W_enc
        cosine = (sae.W_dec @ v) / v.norm().clamp_min(1e-12)
    order = readout.abs().topk(min(top, readout.numel())).indices.tolist()
    return [{"latent": i, "readout": float(readout[i]), "cosine": float(cosine[i])} for i in order]


def _refit(atoms: torch.Tensor, v: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Non-negative least squares ``min |atoms^T c - v|^2, c >= 0`` by projected gradient."""
    gram = atoms @ atoms.T
    target = atoms @ v
    step = 1.0 / float(torch.linalg.matrix_norm(gram, ord=2).clamp_min(1e-12))
    c = (target * step).clamp_min(0)
    for _ in range(steps):
        c = (c - step * (gram @ c - target)).clamp_min(0)
    return c


def sparse_nonnegative_fit(
    sae: SparseAutoencoder, direction: torch.Tensor, *, max_latents: int = 16
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Latents, non-negative coefficients and the residual of the sparse fit (module docstring)."""
    v = direction.float().to(sae.W_dec.device)
    with torch.no_grad():
        dictionary = sae.W_dec.float()
        chosen: list[int] = []
        coeffs = torch.zeros(0, device=v.device)
        residual = v.clone()
        for _ in range(max_latents):
            scores = dictionary @ residual
            if chosen:
                scores[chosen] = float("-inf")
            best = int(scores.argmax())
            if float(scores[best]) <= 1e-9 * float(v.norm()):
                break  # no latent points along what is left
            chosen.append(best)
            coeffs = _refit(dictionary[chosen], v)
            residual = v - coeffs @ dictionary[chosen]
    return chosen, coeffs, residual


@dataclass(frozen=True)
class VectorDecomposition(AnalysisResult):
    """A steering vector's direction at one layer in terms of an SAE's latents."""

    json_file: ClassVar[str] = "decomposition.json"
    vector_source: str
    layer: int
    vector_norm: float
    readout: list[dict[str, Any]]
    fit: list[dict[str, Any]]  # latent, coefficient, share, cosine, logit-lens tokens...
    explained_fraction: float
    residual_norm: float
    latent_details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "vector_norm": self.vector_norm,
            "explained_fraction": self.explained_fraction,
            "latents_in_fit": len(self.fit),
            "top_shares": [(row["latent"], round(row["share"], 4)) for row in self.fit[:5]],
        }

    @figure("decomposition_shares.png")
    def _shares(self, plt) -> Figure | None:
        if not self.fit:
            return None
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [str(row["latent"]) for row in self.fit]
        ax.bar(labels, [row["share"] for row in self.fit], color="tab:green")
        ax.set_xlabel("latent")
        ax.set_ylabel("share of |v|^2")
        ax.set_title(f"layer {self.layer}: {self.explained_fraction:.0%} of the vector's squared norm explained")
        ax.tick_params(axis="x", rotation=60)
        return fig


def decompose_vector(
    sae: SparseAutoencoder,
    vector: SteeringVector,
    *,
    lm: LanguageModel | None = None,
    max_latents: int = 16,
    top: int = 20,
    lens_tokens: int = 8,
    contexts: ActivationStore | None = None,
    contexts_per_latent: int = 5,
) -> VectorDecomposition:
    """Decompose ``vector``'s direction at the SAE's layer (both ways); with ``lm``, each fitted
    latent's logit-lens tokens (promoted and suppressed) are added, and with ``lm`` and ``contexts``
    (held-out activations at the SAE's hook) its density and top-activating contexts too."""
    if contexts is not None and lm is None:
        raise ResidlabError(
            "top contexts need the model (to decode the tokens).", hint="pass lm= together with contexts=."
        )
    layer = sae.cfg.hook.layer
    if layer not in vector.directions:
        raise ResidlabError(
            f"the vector has no direction at the SAE's layer {layer}; it has {vector.layers}.",
            hint="decompose with an SAE trained at one of the vector's layers.",
        )
    v = vector.directions[layer].float()
    if v.numel() != sae.cfg.d_in:
        raise ResidlabError(
            f"the vector has width {v.numel()}, the SAE reads {sae.cfg.d_in}.",
            hint="decompose a vector of the model (and layer) the SAE was trained on.",
        )
    chosen, coeffs, residual = sparse_nonnegative_fit(sae, v, max_latents=max_latents)
    norm_sq = float(v.pow(2).sum()) or 1.0
    cards: dict[int, dict[str, Any]] = {}
    if contexts is not None and lm is not None and chosen:
        options = DashboardOptions(latents=tuple(chosen), contexts=contexts_per_latent, lens_tokens=lens_tokens)
        cards = {card["latent"]: card for card in latent_cards(lm, sae, contexts, options)}
    fit = []
    for latent, c in zip(chosen, coeffs.tolist(), strict=True):
        direction = sae.W_dec[latent].detach().float().cpu()
        row: dict[str, Any] = {
            "latent": latent,
            "coefficient": c,
            "share": c * float(direction @ v) / norm_sq,
            "cosine": float(direction @ v) / max(1e-12, float(v.norm())),
        }
        if latent in cards:
            row.update({key: cards[latent][key] for key in ("promoted", "suppressed", "density", "contexts")})
        elif lm is not None:
            row.update(latent_lens(lm, sae, latent, k=lens_tokens))
        fit.append(row)
    fit.sort(key=lambda r: -r["share"])
    return VectorDecomposition(
        vector_source=vector.source,
        layer=layer,
        vector_norm=float(v.norm()),
        readout=encoder_readout(sae, v, top),
        fit=fit,
        explained_fraction=1.0 - float(residual.pow(2).sum()) / norm_sq,
        residual_norm=float(residual.norm()),
    )


def latent_vector(sae: SparseAutoencoder, latent: int, model: Any, *, scale: float = 1.0) -> SteeringVector:
    """Latent ``latent``'s decoder direction (unit norm) times ``scale`` as a one-layer SteeringVector
    for ``model`` (a model or anything with its shape), usable by every engine and exporter."""
    from residlab.vectors.steering_vector import SteeringVector

    if not 0 <= latent < sae.cfg.d_sae:
        raise ResidlabError(
            f"latent {latent} is outside 0..{sae.cfg.d_sae - 1}.", hint="name a latent the SAE has (its width)."
        )
    hook = sae.cfg.hook
    if hook.site != "block":
        raise ResidlabError(
            f"the SAE reads site {hook.site!r}; steering vectors act on the residual stream after a block.",
            hint="steer with latents of an SAE trained on site 'block'.",
        )
    direction = sae.W_dec[latent].detach().float().cpu() * scale
    return SteeringVector.from_tensor(
        direction,
        model=model,
        layer=hook.layer,
        source=f"sae latent {latent} ({sae.cfg.arch}, width {sae.cfg.d_sae}, k {sae.cfg.k})",
        info={"sae_arch": sae.cfg.arch, "sae_latent": latent, "sae_width": sae.cfg.d_sae, "scale": scale},
    )
