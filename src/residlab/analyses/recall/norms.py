"""Norms with their scale frozen: the linear map that makes direct logit attribution add up exactly.

A LayerNorm or RMSNorm is ``y = centre(x) * s(x) * g + b`` with ``s(x) = 1 / sqrt(var(x) + eps)``
(LayerNorm: ``centre`` subtracts the mean) or ``1 / sqrt(mean(x^2) + eps)`` (RMSNorm: no centring, no
bias). Freezing ``s`` at its value on the actual input makes the norm linear, so a sum of parts
``x = sum_c x_c`` maps to ``y = sum_c centre(x_c) * s * g + b`` exactly: every part's share is
well defined. Gemma's RMSNorm scales by ``1 + weight``; the others by ``weight``. Every linearisation
is checked against the module itself on the input it was frozen at, so a norm of an unknown kind
is a clear error, not a silent wrong number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residlab.core.errors import ResidlabError


@dataclass(frozen=True)
class FrozenNorm:
    """A norm frozen at one input: per-row ``scale`` [rows], ``gain`` [d], optional ``bias`` [d]."""

    scale: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor | None
    centred: bool

    def linear(self, parts: torch.Tensor) -> torch.Tensor:
        """The frozen norm's linear part applied to ``parts`` [rows, ..., d] (no bias)."""
        if self.centred:
            parts = parts - parts.mean(dim=-1, keepdim=True)
        scale = self.scale.reshape(self.scale.shape + (1,) * (parts.dim() - 1))
        return parts * scale * self.gain

    def readout(self, direction: torch.Tensor) -> torch.Tensor:
        """Per row, the vector ``v`` with ``v . x_c = direction . linear(x_c)`` for any part ``x_c``
        (``direction``: [rows, ..., d]): what a direction read after the norm reads before it."""
        scale = self.scale.reshape(self.scale.shape + (1,) * (direction.dim() - 1))
        v = direction * scale * self.gain
        return v - v.mean(dim=-1, keepdim=True) if self.centred else v

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm as frozen, applied to ``x`` [rows, d] (equals the module on its own input)."""
        out = self.linear(x)
        return out if self.bias is None else out + self.bias


def _epsilon(module: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, int | float):
            return float(value)
    raise ResidlabError(
        f"cannot find the epsilon of the norm {type(module).__name__}.",
        hint="the factual-recall analysis handles LayerNorm and RMSNorm modules (eps / variance_epsilon).",
    )


def freeze_norm(module: torch.nn.Module, x: torch.Tensor, *, tolerance: float = 1e-4) -> FrozenNorm:
    """Freeze ``module`` (a LayerNorm or RMSNorm) at its input ``x`` [rows, d] (computed in float32)."""
    x = x.float()
    weight = getattr(module, "weight", None)
    gain = torch.ones(x.shape[-1], device=x.device) if weight is None else weight.detach().float()
    centred = isinstance(module, torch.nn.LayerNorm)
    eps = _epsilon(module)
    if centred:
        bias = getattr(module, "bias", None)
        frozen = FrozenNorm(
            scale=torch.rsqrt(x.var(dim=-1, unbiased=False) + eps),
            gain=gain,
            bias=None if bias is None else bias.detach().float(),
            centred=True,
        )
    else:
        if type(module).__name__.startswith("Gemma"):
            gain = 1.0 + gain  # Gemma's RMSNorm stores weight - 1 (initialised at 0)
        frozen = FrozenNorm(scale=torch.rsqrt(x.pow(2).mean(dim=-1) + eps), gain=gain, bias=None, centred=False)
    dtype = weight.dtype if weight is not None else torch.float32
    with torch.no_grad():
        actual = module(x.to(dtype)).float()
    error = float((frozen(x) - actual).abs().max()) if x.numel() else 0.0
    size = float(actual.abs().max()) if actual.numel() else 0.0
    tolerance = max(tolerance, 8 * torch.finfo(dtype).eps)  # a half-precision module rounds its own output
    if error > tolerance * max(1.0, size):
        raise ResidlabError(
            f"the norm {type(module).__name__} does not behave as a LayerNorm or RMSNorm "
            f"(frozen-scale copy off by {error:.3g}).",
            hint="the factual-recall analysis needs the final norm (and any post-branch norms) to be one of those.",
        )
    return frozen
