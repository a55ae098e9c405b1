"""RelP: the LRP rules of Rezaei Jafari et al. (2025) as hooks on the unmodified transformers modules.

Each rule keeps the forward value exactly and changes only the backward pass, by the identity
``out = y.detach() + (x - x.detach()) * J.detach()``, whose value is ``y`` and whose derivative with
respect to ``x`` is the chosen local factor ``J``:

- ``norm`` (LN-rule): every RMSNorm / LayerNorm (the blocks', the final one, Gemma's q/k and sandwich
  norms) with its normalising scale detached: ``J = w_eff / rms(x)`` (``w_eff = w``, or ``1 + w`` for
  Gemma's RMSNorm); for LayerNorm the centring stays differentiable: ``x_c * (w / std(x)).detach()``.
  The hand-computed output is checked against the module's own on its first call.
- ``activation`` (identity rule): the MLP's activation module, ``J = act(x) / stabilise(x)`` with
  ``stabilise(z) = z + sign(z) * eps`` (``eps`` at 0).
- ``gated`` (half rule): the input of a gated MLP's down-projection ``g = act(gate) * up`` becomes
  ``g / 2 + (g / 2).detach()``, so each factor of the product receives half (families without a gated
  product have nothing to apply it to).
- ``attention`` (AH-rule): the softmax pattern detached (:mod:`.relp_attention`).
- linear layers: the plain gradient.

A module a rule cannot take (a norm of unknown form, an activation that is not a module, attention
that bypasses the AttentionInterface) is a clear error, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from residlab.analyses.patching.relp_attention import detached_attention
from residlab.analyses.patching.relp_switch import RuleSwitch, route
from residlab.core.errors import ResidlabError
from residlab.interventions.hooks import HookSet

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class RelpRules:
    """Which LRP rules RelP applies (all by default; all off = AtP)."""

    norm: bool = True
    activation: bool = True
    attention: bool = True
    gated: bool = True
    epsilon: float = 1e-6

    def names(self) -> list[str]:
        return [n for n in ("norm", "activation", "attention", "gated") if getattr(self, n)]


NO_RULES = RelpRules(norm=False, activation=False, attention=False, gated=False)  # the plain gradient: AtP


def applied_rule_names(lines: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The rules that ``relp_rules`` reported as applied (its ``name: ...`` lines), in
    :meth:`RelpRules.names` order; a rule the model had nothing to apply to is left out."""
    applied = {line.split(":")[0] for line in lines if "not applicable" not in line}
    return tuple(name for name in RelpRules().names() if name in applied)


def with_local_factor(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``y`` in value, ``factor`` (detached) as its elementwise derivative with respect to ``x``."""
    return y.detach() + (x - x.detach()) * factor.detach()


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + sign(z) * eps``, with ``+eps`` at 0 (the LRP epsilon stabiliser)."""
    return z + torch.where(z >= 0, eps, -eps).to(z.dtype)


# -- the LN-rule ---------------------------------------------------------------------------------
NormRule = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (module, x) -> (the tensor the gradient flows into, the norm's output by hand, the local factor)


def _rms_rule(plus_one: bool) -> NormRule:
    def rule(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if eps is None or weight is None:
            raise ResidlabError(
                f"RelP's LN-rule cannot read the epsilon and weight of {type(module).__name__}.",
                hint="turn the norm rule off (RelpRules(norm=False)) for this model.",
            )
        xf = x.float()
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        scale = (1.0 + weight.float()) if plus_one else weight.float()
        return x, xf * inv_rms * scale, inv_rms * scale

    return rule


def _layer_norm_rule(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    norm: Any = module
    xf = x.float()
    centred = xf - xf.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
    weight = norm.weight.float() if norm.weight is not None else torch.ones_like(inv_std)
    bias = norm.bias.float() if norm.bias is not None else 0.0
    return centred, centred * inv_std * weight + bias, inv_std * weight


def norm_rule_for(module: torch.nn.Module) -> NormRule | None:
    """The LN-rule for a norm module, ``None`` for a module that is no norm, or an error for a norm of
    unknown form."""
    name = type(module).__name__
    if isinstance(module, torch.nn.LayerNorm):
        return _layer_norm_rule
    if name.endswith("RMSNorm"):
        return _rms_rule(plus_one=name.startswith("Gemma"))
    if "Norm" in name and any(True for _ in module.parameters(recurse=False)):
        raise ResidlabError(
            f"RelP's LN-rule has no form for {name}.",
            hint="turn the norm rule off (RelpRules(norm=False)), or add the norm's form to "
            "residlab/analyses/patching/relp.py.",
        )
    return None


def _norm_hook(rule: NormRule, switch: RuleSwitch | None = None) -> Callable[..., torch.Tensor]:
    checked = [False]

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        flow, by_hand, factor = rule(module, x)
        if not checked[0]:  # the form matches this module's own computation, else the rule would lie
            if not torch.allclose(by_hand.to(output.dtype), output, rtol=2e-2, atol=1e-3):
                raise ResidlabError(
                    f"RelP's LN-rule: {type(module).__name__}'s output is not the form residlab assumed for it.",
                    hint="turn the norm rule off (RelpRules(norm=False)) for this model.",
                )
            checked[0] = True
        return route(output, with_local_factor(flow, output, factor).to(output.dtype), "norm", switch)

    return hook


def _activation_hook(eps: float, switch: RuleSwitch | None = None) -> Callable[..., torch.Tensor]:
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return route(output, with_local_factor(x, output, output / stabilise(x, eps)), "activation", switch)

    return hook


def half_rule(g: torch.Tensor) -> torch.Tensor:
    """``g / 2 + (g / 2).detach()``: the value of ``g``, half its gradient to each factor of the product."""
    return g * 0.5 + (g * 0.5).detach()


@contextmanager
def relp_rules(
    lm: LanguageModel, rules: RelpRules = RelpRules(), switch: RuleSwitch | None = None
) -> Iterator[list[str]]:
    """While the block runs, backward passes through ``lm`` follow ``rules``; yields what was applied
    (one line per rule). Every hook is removed and the attention setting restored on exit.

    With a ``switch`` (:mod:`.relp_switch`), ``rules`` are the rules any pass may use, and each backward
    pass follows ``switch.active`` at the time it runs: rule sets share one forward pass."""
    hooks, applied = HookSet(), []
    try:
        with ExitStack() as stack:
            if rules.norm:
                norms = [(m, r) for m in lm.model.modules() if (r := norm_rule_for(m)) is not None]
                for module, rule in norms:
                    hooks.forward(module, _norm_hook(rule, switch))
                applied.append(f"norm: {len(norms)} norm modules, scale detached")
            if rules.activation:
                for layer in range(lm.num_layers):
                    act = lm.block_part(layer, "mlp_act_fn")
                    if not isinstance(act, torch.nn.Module):
                        raise ResidlabError(
                            f"RelP's identity rule needs the MLP activation as a module; {lm.arch.family}'s is not.",
                            hint="turn the activation rule off (RelpRules(activation=False)).",
                        )
                    hooks.forward(act, _activation_hook(rules.epsilon, switch))
                applied.append(f"activation: identity rule on {lm.num_layers} MLP activations")
            if rules.gated:
                if lm.arch.mlp_up is None:
                    applied.append("gated: not applicable (no gated MLP product in this family)")
                else:
                    for layer in range(lm.num_layers):
                        hooks.replace(
                            lm.block_part(layer, "mlp_down"), "input", lambda g: route(g, half_rule(g), "gated", switch)
                        )
                    applied.append(f"gated: half rule on {lm.num_layers} gated MLP products")
            if rules.attention:
                stack.enter_context(detached_attention(lm.model, expected_calls=lm.num_layers, switch=switch))
                applied.append("attention: softmax pattern detached (AttentionInterface)")
            yield applied
    finally:
        hooks.remove_all()
