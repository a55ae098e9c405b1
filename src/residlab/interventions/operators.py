"""How a steering delta changes an activation: addition and the operators beyond it.

An operator is a plain callable ``op(hidden, delta, mask) -> new hidden``: ``hidden`` is a site's value
``h`` [batch, tokens, d], ``delta`` is ``δ = strength * v`` ([1 or batch, 1, d]), and ``mask``
[batch, tokens, 1] (1 where the position rule steers, else 0). In the formulas ``m`` is the mask,
``·`` the dot product over ``d`` and ``δ̂ = δ / ‖δ‖``. Every operator leaves a position unchanged
where ``m = 0`` or ``δ = 0`` (so strength 0 is exactly no steering, under every operator).

Add one by writing a function with that signature and putting it in :data:`OPERATORS` (or passing it
to ``lm.steer(..., operator=fn)``). Non-additive operators compute in float32 and cast back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from residlab.core.registry import lookup

SteeringOperator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def add(hidden: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Activation addition: ``h' = h + m δ``."""
    return hidden + mask * delta


def _unit(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(δ̂, ‖δ‖)`` in float32; a zero ``δ`` gives a zero ``δ̂``."""
    d = delta.float()
    norm = d.norm(dim=-1, keepdim=True)
    return d / norm.clamp_min(torch.finfo(torch.float32).tiny), norm


def _where(mask: torch.Tensor, norm: torch.Tensor, new: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``new`` where the rule steers and ``δ ≠ 0``, else ``hidden`` exactly."""
    return torch.where((mask > 0) & (norm > 0), new.to(hidden.dtype), hidden)


def project_out(hidden: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Directional ablation: ``h' = h - m (h·δ̂) δ̂``, the component of ``h`` along ``δ`` removed.

    Only the direction of ``δ`` counts (the strength's size and sign do not, beyond 0 = off): the
    result is orthogonal to ``v`` (Arditi et al. 2024's refusal-direction ablation; steering-vectors'
    ``ablation_operator``).
    """
    u, norm = _unit(delta)
    h = hidden.float()
    return _where(mask, norm, h - (h * u).sum(-1, keepdim=True) * u, hidden)


def add_norm_preserving(hidden: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Addition rescaled to the activation's own norm: ``h' = ‖h‖ (h + δ) / ‖h + δ‖`` where ``m = 1``.

    Turns ``h`` towards ``δ`` without changing its length, which later norms would otherwise see
    (repeng's ``normalize=True``).
    """
    _, norm = _unit(delta)
    h = hidden.float()
    steered = h + delta.float()
    scale = h.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return _where(mask, norm, steered * scale, hidden)


def clamp(hidden: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Clamp the coefficient along the direction: ``h' = h + m (‖δ‖ - h·δ̂) δ̂``.

    Whatever ``h``'s component along ``v`` was, it becomes ``strength * ‖v‖`` (so, for a unit vector,
    the strength itself, negative values included); the rest of ``h`` is kept. Equal to projecting the
    direction out and then adding ``δ`` (steering-vectors' ``ablation_then_addition_operator``).
    """
    u, norm = _unit(delta)
    h = hidden.float()
    return _where(mask, norm, h + (norm - (h * u).sum(-1, keepdim=True)) * u, hidden)


OPERATORS: dict[str, SteeringOperator] = {
    "add": add,
    "project_out": project_out,
    "add_norm_preserving": add_norm_preserving,
    "clamp": clamp,
}


def steering_operator(operator: str | SteeringOperator) -> SteeringOperator:
    """An operator by name (:data:`OPERATORS`), or a callable passed through."""
    return lookup(
        OPERATORS, operator, what="steering operator", extend_hint="a function (hidden, delta, mask) -> new hidden"
    )
