"""One forward pass, several RelP rule sets: each rule's backward chosen when the backward pass runs.

RelP's rules keep every forward value and change only derivatives, so runs that differ only in their
rules share their forward pass. Under a :class:`RuleSwitch`, each rule hook keeps both of its
derivatives in the graph (the module's plain one and the rule's) and :func:`route` joins them: the value
is the plain output, and the gradient flows into the branch the switch's ``active`` rules name *at the
time of the backward pass*. Set ``switch.active``, call ``torch.autograd.grad(..., retain_graph=True)``,
set the next rule set, differentiate again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from residlab.analyses.patching.relp import RelpRules


class RuleSwitch:
    """The rule set the next backward pass follows (mutable on purpose: set it between passes)."""

    def __init__(self, active: RelpRules) -> None:
        self.active = active

    def is_on(self, rule: str) -> bool:
        return bool(getattr(self.active, rule))


class _Routed(torch.autograd.Function):
    """Value of ``plain``; gradient into ``ruled`` while ``switch`` has ``rule`` on, else into ``plain``."""

    @staticmethod
    def forward(ctx: Any, plain: torch.Tensor, ruled: torch.Tensor, switch: RuleSwitch, rule: str) -> torch.Tensor:
        ctx.switch, ctx.rule = switch, rule
        return plain.view_as(plain)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        on = ctx.switch.is_on(ctx.rule)
        to_plain = grad if not on and ctx.needs_input_grad[0] else None
        to_ruled = grad if on and ctx.needs_input_grad[1] else None
        return to_plain, to_ruled, None, None


def route(plain: torch.Tensor, ruled: torch.Tensor, rule: str, switch: RuleSwitch | None) -> torch.Tensor:
    """``ruled`` where no switch is given (one rule set: the rule always applies), else the two joined by
    the switch (equal values; which derivative counts is decided per backward pass)."""
    if switch is None:
        return ruled
    return _Routed.apply(plain, ruled, switch, rule)
