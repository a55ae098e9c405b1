"""Ablations on the patching machinery: what replaces a component's activation in the clean run.

- ``zero``: zeros;
- ``mean``: the mean over the reference prompts at the same column (padding left out);
- ``resample``: another prompt's activation (pair ``i`` gets pair ``i + 1``'s, cyclically).

The effect of ablating a site is then ``metric(clean with the site ablated) - metric(clean)``, from
:func:`~residlab.analyses.patching.exact.exact_effects` (exactly) or the estimates (approximately).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from residlab.analyses.patching.activations import SiteKey
from residlab.core.registry import lookup

Ablation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (values [n, T, W], mask [n, T]) -> same shape


def zero_ablation(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zeros in place of every activation."""
    return torch.zeros_like(values)


def mean_ablation(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each column's mean over the rows where it is a real token (padding columns keep zeros)."""
    weight = mask.to(values.dtype).unsqueeze(-1)  # [n, T, 1]
    mean = (values * weight).sum(0) / weight.sum(0).clamp(min=1)  # [T, W]
    return mean.unsqueeze(0).expand_as(values).clone()


def resample_ablation(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row ``i`` gets row ``i + 1``'s activation (cyclically); a lone row is unchanged."""
    return values.roll(-1, dims=0)


ABLATIONS: dict[str, Ablation] = {"zero": zero_ablation, "mean": mean_ablation, "resample": resample_ablation}


def ablation_sources(
    kind: str | Ablation, values: dict[SiteKey, torch.Tensor], mask: torch.Tensor
) -> dict[SiteKey, torch.Tensor]:
    """The replacement activations of ablation ``kind`` for every recorded (layer, site)."""
    ablate = lookup(ABLATIONS, kind, what="ablation", extend_hint="pass a callable (values, mask) -> values")
    return {key: ablate(v, mask) for key, v in values.items()}
