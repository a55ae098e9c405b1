"""TopK sparse autoencoder (Gao et al. 2024, arXiv 2406.04093).

``z = ReLU(TopK(W_enc^T (x - b_dec) + b_enc))``: exactly ``k`` latents are selected per token (fewer
can be non-zero when a selected pre-activation is negative). Loss: the normalised MSE (squared error
over the batch's mean-centred variance) plus ``aux_coeff`` times AuxK on the dead latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residlab.saes.base import LossTerms, SAEConfig, SAEOutput, SparseAutoencoder, item, nmse_centred, register


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    """A TopK SAE: ``k`` active latents per token."""

    arch = "topk"


def topk_codes(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's ``k`` largest pre-activations (then ReLU); zeros elsewhere."""
    values, index = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, index, values.relu())


@register("topk")
class TopKSAE(SparseAutoencoder):
    """See the module docstring."""

    config_cls = TopKConfig

    def forward(self, x: torch.Tensor, *, sample: bool | None = None) -> SAEOutput:
        pre = self.pre_activations(x)
        z = topk_codes(pre, self.cfg.k)
        return SAEOutput(self.decode(z), z, pre, {})

    def loss(self, x: torch.Tensor, *, step_fraction: float = 1.0) -> tuple[LossTerms, SAEOutput]:
        out = self.forward(x)
        recon = nmse_centred(out.x_hat, x)
        aux = self.aux_k_loss(x, out)
        total = recon + self.cfg.aux_coeff * aux
        return LossTerms(total, {"loss": item(total), "nmse": item(recon), "aux_k": item(aux)}), out
