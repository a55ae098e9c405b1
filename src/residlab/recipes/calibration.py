"""Steering strength from the KL bound of the ASC paper (appendix A.1), and the KL actually measured.

F maps the layer-l residual at the last position to the next-token logits. For a unit vector v:
``a = ||J v||`` (a Jacobian-vector product) and ``L = ||d^2/dt^2 F(h + t v)||`` at t = 0 (the
second directional derivative, i.e. the Hessian-vector product along v), which bounds how fast
``J v`` changes along v. Then

    KL(p || p_steered) <= a^2 g^2 / 4 + L a g^3 / 4 + L^2 g^4 / 16,

and the largest strength g with KL <= eps (dropping the quartic term) comes from the one positive
root of ``x^3 + x^2 - beta = 0`` with ``x = L g / a`` and ``beta = 4 eps L^2 / a^4``. The strength
applies to the UNIT vector. Statistics over calibration states: a = median, L = 95th percentile.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from residlab.interventions.steer import Steering
from residlab.models.lm import LanguageModel


def kl_bound(a: float, lipschitz: float, gamma: float) -> float:
    """The paper's upper bound on KL(p || p_steered) at strength ``gamma`` on a unit vector."""
    return a * a * gamma**2 / 4 + lipschitz * a * gamma**3 / 4 + lipschitz**2 * gamma**4 / 16


def positive_cubic_root(beta: float) -> float:
    """The unique positive root of x^3 + x^2 - beta = 0 (beta > 0), by Cardano's formula.

    With x = y - 1/3 the cubic is y^3 + p y + q = 0, p = -1/3, q = 2/27 - beta. One real root when
    the discriminant is positive (beta > 4/27); otherwise three real roots (trigonometric form),
    of which exactly one is positive since f(0) = -beta < 0 and f increases for x > 0.
    """
    if beta <= 0:
        return 0.0
    p, q = -1.0 / 3.0, 2.0 / 27.0 - beta
    disc = (q / 2) ** 2 + (p / 3) ** 3
    if disc >= 0:
        root = math.sqrt(disc)
        y = math.copysign(abs(-q / 2 + root) ** (1 / 3), -q / 2 + root) + math.copysign(
            abs(-q / 2 - root) ** (1 / 3), -q / 2 - root
        )
        return y - 1.0 / 3.0
    radius = 2 * math.sqrt(-p / 3)
    angle = math.acos(max(-1.0, min(1.0, (3 * q / (2 * p)) * math.sqrt(-3 / p)))) / 3
    roots = [radius * math.cos(angle - 2 * math.pi * k / 3) - 1.0 / 3.0 for k in range(3)]
    return max(roots)


def strength_from_bound(a: float, lipschitz: float, eps: float = 1e-3) -> float:
    """Largest strength (on a unit vector) whose KL bound stays within ``eps``.

    Limits: L -> 0 gives 2 sqrt(eps) / a; a = 0 gives (16 eps)^(1/4) / sqrt(L).
    """
    if a < 0 or lipschitz < 0 or eps <= 0:
        raise ValueError("a and L must be >= 0 and eps > 0")
    if a == 0 and lipschitz == 0:
        return math.inf
    if a == 0:
        return (16 * eps) ** 0.25 / math.sqrt(lipschitz)
    beta = 4 * eps * lipschitz**2 / a**4
    if lipschitz == 0 or beta < 1e-12:  # the quadratic term alone; avoids 0/0 in a / L
        return 2 * math.sqrt(eps) / a
    x = positive_cubic_root(beta)
    gamma_raw = a / lipschitz * x
    return max(0.0, (1 - lipschitz * gamma_raw / (4 * a)) * gamma_raw)


def _last_logits(
    lm: LanguageModel, ids: torch.Tensor, layer: int, direction: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Next-token logits (float32) with t * direction added to block ``layer``'s output at the last token."""
    with Steering(lm, {layer: t * direction}, rule=[-1]):
        out = lm.model(input_ids=ids, use_cache=False)
    return out.logits[0, -1].float()


def directional_derivatives(
    lm: LanguageModel, text: str, layer: int, direction: torch.Tensor, *, add_special_tokens: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(J v, d^2F/dt^2) at t = 0 for one calibration text: exact Jacobian- and Hessian-vector products
    by nested forward-over-reverse differentiation with respect to the scalar strength t."""
    ids = lm.encode([text], add_special_tokens=add_special_tokens).input_ids
    unit = (direction / direction.norm()).to(lm.device, torch.float32)
    t0 = torch.zeros((), device=lm.device, requires_grad=True)
    one = torch.ones((), device=lm.device)

    def first(t: torch.Tensor) -> torch.Tensor:
        return torch.autograd.functional.jvp(
            lambda s: _last_logits(lm, ids, layer, unit, s), t, one, create_graph=True
        )[1]

    # The fused CPU attention kernels have no double backward; the math kernel is plain differentiable ops.
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        jv = first(t0)
        hv = torch.autograd.functional.jvp(first, t0, one)[1]
    return jv.detach(), hv.detach()


@dataclass(frozen=True)
class Calibration:
    layer: int
    eps: float
    a: float  # median ||J v||
    lipschitz: float  # 95th percentile of ||H[v, v]||
    strength: float  # on the unit vector
    a_values: list[float]
    l_values: list[float]
    measured_kl_median: float | None = None
    measured_kl_p95: float | None = None
    bound_at_strength: float | None = None
    # The same bound on mean-free (centred) logit changes: softmax is shift-invariant, so it is valid
    # and tighter (the paper's a counts the uniform logit shift that changes no probability).
    a_centred: float | None = None
    lipschitz_centred: float | None = None
    strength_centred: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def measured_kl(
    lm: LanguageModel,
    texts: Sequence[str],
    layer: int,
    direction: torch.Tensor,
    strength: float,
    *,
    add_special_tokens: bool = False,
) -> list[float]:
    """KL(p || p_steered) of the next-token distribution at the last token of each text."""
    unit = (direction / direction.norm()).to(lm.device, torch.float32)
    values = []
    with torch.no_grad():
        for text in texts:
            ids = lm.encode([text], add_special_tokens=add_special_tokens).input_ids
            base = torch.log_softmax(_last_logits(lm, ids, layer, unit, torch.tensor(0.0)).double(), -1)
            steered = torch.log_softmax(_last_logits(lm, ids, layer, unit, torch.tensor(float(strength))).double(), -1)
            # KL >= 0; for a tiny strength rounding can leave -1e-8, which is zero.
            values.append(max(0.0, float((base.exp() * (base - steered)).sum())))
    return values


def calibrate(
    lm: LanguageModel,
    texts: Sequence[str],
    held_out: Sequence[str],
    layer: int,
    direction: torch.Tensor,
    *,
    eps: float = 1e-3,
    add_special_tokens: bool = False,
) -> Calibration:
    """a, L over ``texts``, the bound's strength, and the KL measured at that strength on ``held_out``."""
    a_values, l_values, a_centred, l_centred = [], [], [], []
    for text in texts:
        jv, hv = directional_derivatives(lm, text, layer, direction, add_special_tokens=add_special_tokens)
        a_values.append(float(jv.norm()))
        l_values.append(float(hv.norm()))
        # Softmax ignores a shift of all logits by one constant (the Fisher matrix has the all-ones
        # vector in its null space), so the bound also holds with the mean-free parts, and is tighter.
        a_centred.append(float((jv - jv.mean()).norm()))
        l_centred.append(float((hv - hv.mean()).norm()))
    a = statistics.median(a_values)
    lipschitz = _p95(l_values)
    strength = strength_from_bound(a, lipschitz, eps)
    kls = (
        measured_kl(lm, held_out, layer, direction, strength, add_special_tokens=add_special_tokens) if held_out else []
    )
    return Calibration(
        layer=layer,
        eps=eps,
        a=a,
        lipschitz=lipschitz,
        strength=strength,
        a_values=a_values,
        l_values=l_values,
        measured_kl_median=statistics.median(kls) if kls else None,
        measured_kl_p95=float(torch.quantile(torch.tensor(kls), 0.95)) if len(kls) > 1 else (kls[0] if kls else None),
        bound_at_strength=kl_bound(a, lipschitz, strength),
        a_centred=statistics.median(a_centred),
        lipschitz_centred=_p95(l_centred),
        strength_centred=strength_from_bound(statistics.median(a_centred), _p95(l_centred), eps),
    )


def _p95(values: list[float]) -> float:
    return float(torch.quantile(torch.tensor(values), 0.95)) if len(values) > 1 else values[0]
