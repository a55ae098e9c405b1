"""Guidance (Subramaniam et al. 2024, "Training the Untrainable", arXiv 2410.20035): a CKA loss that pulls a
target network's layers towards a frozen guide's.

``loss = task loss + weight * sum over mapped layers l of (1 - CKA(target_l, guide_m(l)))``, with linear
CKA over the tokens of a batch (the paper uses the biased estimator; ``debiased=True`` uses the
unbiased-HSIC one, which does not reward noise at small batches). The guide's states are detached:
the guide never changes. Layers are paired by :func:`~residlab.analyses.cka_math.even_stride_mapping`
unless a mapping is given. :class:`CkaGuidanceLoss` is an ordinary ``torch.nn.Module`` and fits any
training loop::

    guidance = CkaGuidanceLoss.even_stride(num_target_layers=3, num_guide_layers=30)
    loss = task_loss + guidance(target_states, guide_states, mask)   # states: lists of [B, T, d]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from residlab.analyses.cka_math import even_stride_mapping, linear_cka
from residlab.core.errors import ResidlabError


def _tokens(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[n, d] rows of ``states`` ([B, T, d] or [n, d]) where ``mask`` ([B, T] bool) is set."""
    if states.dim() == 2:
        return states
    return states[mask] if mask is not None else states.reshape(-1, states.shape[-1])


class CkaGuidanceLoss(torch.nn.Module):
    """``weight * sum_l (1 - CKA(target[l], guide[mapping[l]]))`` over the mapped layers.

    ``mapping`` maps a target layer index to a guide layer index; ``guide`` may be a sequence indexed
    by guide layer or a mapping holding just the guide layers used.
    """

    def __init__(self, mapping: Mapping[int, int], *, weight: float = 1.0, debiased: bool = False) -> None:
        super().__init__()
        if not mapping:
            raise ResidlabError(
                "the guidance mapping is empty.", hint="map at least one target layer to a guide layer."
            )
        if not weight >= 0:
            raise ResidlabError(f"the guidance weight must be >= 0, got {weight}.", hint="pass e.g. 1.0.")
        self.mapping = dict(mapping)
        self.weight = float(weight)
        self.debiased = debiased

    @classmethod
    def even_stride(
        cls, num_target_layers: int, num_guide_layers: int, *, weight: float = 1.0, debiased: bool = False
    ) -> CkaGuidanceLoss:
        """Every target layer guided by the guide layer the even-stride mapping gives it."""
        mapping = dict(enumerate(even_stride_mapping(num_target_layers, num_guide_layers)))
        return cls(mapping, weight=weight, debiased=debiased)

    def similarities(
        self,
        target: Sequence[torch.Tensor],
        guide: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """CKA per mapped target layer (differentiable in ``target``)."""
        out = {}
        for t, g in self.mapping.items():
            x = _tokens(target[t], mask)
            y = _tokens(guide[g], mask).detach()
            out[t] = linear_cka(x.float(), y.float(), debiased=self.debiased)
        return out

    def forward(
        self,
        target: Sequence[torch.Tensor],
        guide: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The guidance term to add to the task loss."""
        sims = self.similarities(target, guide, mask)
        return self.weight * torch.stack([1 - s for s in sims.values()]).sum()
