"""Variational TopK sparse autoencoder (Baker & Li 2025, arXiv 2509.22994).

The encoder gives a mean ``mu = W_enc^T (x - b_dec) + b_enc`` and a log-variance
``log_var = clamp(W_var^T (x - b_dec) + b_var, -6, 2)`` (``b_var`` starts at -2). With sampling on,
``z = mu + exp(log_var / 2) * eps``; then TopK on ``|z|`` keeps the ``k`` largest magnitudes *with
their sign*. Loss: normalised MSE + beta * KL(N(mu, sigma^2) || N(0, I)) + AuxK, where beta ramps
linearly from 0 to ``kl_coeff`` over the first ``kl_warmup`` fraction of training.

``sample`` is honest: the published checkpoints were trained with it off (no noise: a TopK SAE with
an L2 penalty on ``mu``); ``cfg.sample`` is what training uses, and every call can override it.
The KL is averaged over latents and tokens (so ``kl_coeff`` does not scale with the width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from residlab.saes.base import LossTerms, SAEConfig, SAEOutput, SparseAutoencoder, item, nmse_centred, register

LOG_VAR_RANGE = (-6.0, 2.0)


@dataclass(frozen=True)
class VSAEConfig(SAEConfig):
    """A variational TopK SAE (see the module docstring)."""

    arch = "vsae"
    sample: bool = False
    kl_coeff: float = 1e-3
    kl_warmup: float = 0.1
    log_var_init: float = -2.0


def signed_topk_codes(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's ``k`` entries of largest magnitude, sign included; zeros elsewhere."""
    index = z.abs().topk(k, dim=-1).indices
    return torch.zeros_like(z).scatter(-1, index, z.gather(-1, index))


@register("vsae")
class VariationalSAE(SparseAutoencoder):
    """See the module docstring."""

    config_cls = VSAEConfig
    cfg: VSAEConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        assert isinstance(cfg, VSAEConfig)
        self.W_var = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_var = nn.Parameter(torch.full((cfg.d_sae,), cfg.log_var_init))

    def log_variance(self, x: torch.Tensor) -> torch.Tensor:
        """The clamped posterior log-variance [tokens, d_sae]."""
        return ((x - self.b_dec) @ self.W_var + self.b_var).clamp(*LOG_VAR_RANGE)

    def forward(self, x: torch.Tensor, *, sample: bool | None = None, generator: torch.Generator | None = None):
        sample = self.cfg.sample if sample is None else sample
        mu = self.pre_activations(x)
        log_var = self.log_variance(x)
        if sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            noisy = mu + torch.exp(0.5 * log_var) * eps
        else:
            noisy = mu
        z = signed_topk_codes(noisy, self.cfg.k)
        return SAEOutput(self.decode(z), z, mu, {"log_var": log_var, "selected": noisy})

    def loss(self, x: torch.Tensor, *, step_fraction: float = 1.0) -> tuple[LossTerms, SAEOutput]:
        out = self.forward(x)
        mu, log_var = out.pre, out.extra["log_var"]
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).mean()
        warm = 1.0 if self.cfg.kl_warmup <= 0 else min(1.0, step_fraction / self.cfg.kl_warmup)
        beta = self.cfg.kl_coeff * warm
        recon = nmse_centred(out.x_hat, x)
        aux = self.aux_k_loss(x, out)
        total = recon + beta * kl + self.cfg.aux_coeff * aux
        parts = {"loss": item(total), "nmse": item(recon), "aux_k": item(aux), "kl": item(kl), "beta": beta}
        return LossTerms(total, parts), out
