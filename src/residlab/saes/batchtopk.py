"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, arXiv 2412.06410).

Training keeps the ``k x batch`` largest ReLU'd pre-activations over the *whole batch* (so a token
may use more or fewer than ``k`` latents, ``k`` on average). Inference cannot depend on the batch, so
it uses a global threshold ``theta``: ``z = pre * (pre > theta)`` (a JumpReLU with one threshold),
``theta`` tracked during training as a running mean of the smallest activation the batch rule kept.
Loss: the normalised MSE plus ``aux_coeff`` times AuxK, as for TopK.

The threshold is stored once per latent (all equal), so SAELens reads the file as its ``jumprelu``
architecture with the same inference equations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residlab.core.errors import ResidlabError
from residlab.saes.base import LossTerms, SAEConfig, SAEOutput, SparseAutoencoder, item, nmse_centred, register


@dataclass(frozen=True)
class BatchTopKConfig(SAEConfig):
    """A BatchTopK SAE: ``k`` active latents per token on average over a batch."""

    arch = "batchtopk"
    threshold_lr: float = 0.01  # weight of each batch's smallest kept activation in the running threshold

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold_lr <= 1:
            raise ResidlabError(
                f"threshold_lr must be in (0, 1], got {self.threshold_lr}.", hint="use e.g. 0.01 (the paper's)."
            )


def batch_topk_codes(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k * rows`` largest ReLU'd pre-activations of the whole batch; zeros elsewhere."""
    acts = pre.relu().flatten()
    values, index = acts.topk(min(k * pre.shape[0], acts.numel()))
    return torch.zeros_like(acts).scatter(0, index, values).view_as(pre)


@register("batchtopk")
class BatchTopKSAE(SparseAutoencoder):
    """See the module docstring."""

    config_cls = BatchTopKConfig
    threshold: torch.Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def forward(self, x: torch.Tensor, *, sample: bool | None = None) -> SAEOutput:
        """The inference rule: a JumpReLU at the learned global threshold."""
        pre = self.pre_activations(x)
        z = pre * (pre > self.threshold).to(pre.dtype) * (pre > 0).to(pre.dtype)
        return SAEOutput(self.decode(z), z, pre, {})

    def loss(self, x: torch.Tensor, *, step_fraction: float = 1.0) -> tuple[LossTerms, SAEOutput]:
        """The batch rule, and one update of the running threshold from what it kept."""
        pre = self.pre_activations(x)
        z = batch_topk_codes(pre, self.cfg.k)
        out = SAEOutput(self.decode(z), z, pre, {})
        self._update_threshold(z)
        recon = nmse_centred(out.x_hat, x)
        aux = self.aux_k_loss(x, out)
        total = recon + self.cfg.aux_coeff * aux
        parts = {"loss": item(total), "nmse": item(recon), "aux_k": item(aux), "threshold": float(self.threshold[0])}
        return LossTerms(total, parts), out

    @torch.no_grad()
    def _update_threshold(self, z: torch.Tensor) -> None:
        kept = z[z > 0]
        if kept.numel() == 0:
            return
        rate = self.cfg.threshold_lr  # type: ignore[attr-defined]
        self.threshold.mul_(1 - rate).add_(rate * kept.min().to(self.threshold.dtype))
