"""RelP's rules checked against their formulas on single modules, AtP == RelP == exact patching on a
purely linear model (at one point and along the input path), and the hooks leave no trace."""

from __future__ import annotations

import pytest
import torch

from residlab.analyses.patching.activations import record_values, unit_shape
from residlab.analyses.patching.attribution import InputPath, attribute, estimated_effects
from residlab.analyses.patching.exact import PatchRun, exact_effects
from residlab.analyses.patching.metrics import MetricTargets, get_metric
from residlab.analyses.patching.pairs import encode_pairs
from residlab.analyses.patching.relp import (
    RelpRules,
    _activation_hook,
    _norm_hook,
    half_rule,
    norm_rule_for,
    relp_rules,
    stabilise,
)
from residlab.analyses.patching.relp_attention import detached_attention, detached_pattern_attention
from residlab.analyses.patching.sites import FAMILIES, site_grid
from residlab.core.errors import ResidlabError
from residlab.data.prompt_pairs import PromptPair
from residlab.testing import tiny_model

PAIRS = [
    PromptPair("Natalia sold clips in May", "Natalia sold clips in April", " and", " then"),
    PromptPair("The answer is 72", "The answer is 24", ".", " +"),
]


def _grad_through(
    module: torch.nn.Module, hook, x: torch.Tensor, upstream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, d(output . upstream)/dx) of ``module`` with ``hook`` as a forward hook."""
    handle = module.register_forward_hook(hook)
    x = x.clone().requires_grad_(True)
    try:
        y = module(x)
        (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    finally:
        handle.remove()
    return y.detach(), grad


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_ln_rule_on_rmsnorm_is_scale_detached(family):
    norm = tiny_model(family).blocks[0].input_layernorm
    torch.nn.init.normal_(norm.weight, std=0.5)
    x, c = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    y, grad = _grad_through(norm, _norm_hook(norm_rule_for(norm)), x, c)
    weight = (1 + norm.weight) if family == "gemma3" else norm.weight
    inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(norm, "variance_epsilon", getattr(norm, "eps", 0)))
    assert torch.allclose(y, norm(x).detach())  # the value is the module's own
    assert torch.allclose(grad, c * weight.detach() * inv_rms, atol=1e-5)
    plain = torch.autograd.grad(
        (norm(x.clone().requires_grad_(True)) * c).sum(), x.requires_grad_(True), allow_unused=True
    )
    assert plain is not None


def test_ln_rule_on_layernorm_keeps_centring_differentiable():
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight)
    x, c = torch.randn(3, 16), torch.randn(3, 16)
    y, grad = _grad_through(norm, _norm_hook(norm_rule_for(norm)), x, c)
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    g = c * norm.weight.detach() / std
    assert torch.allclose(y, norm(x).detach(), atol=1e-6)
    assert torch.allclose(grad, g - g.mean(-1, keepdim=True), atol=1e-5)


def test_ln_rule_refuses_an_unknown_norm():
    class FancyNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

    with pytest.raises(ResidlabError, match="no form for FancyNorm"):
        norm_rule_for(FancyNorm())


def test_ln_rule_refuses_a_norm_whose_output_is_not_the_assumed_form():
    norm = tiny_model("qwen2").blocks[0].input_layernorm
    wrong = _norm_hook(norm_rule_for(tiny_model("gemma3").blocks[0].input_layernorm))  # (1 + w) form on a plain RMSNorm
    torch.nn.init.normal_(norm.weight)
    with pytest.raises(ResidlabError, match="not the form"):
        _grad_through(norm, wrong, torch.randn(1, 3, 64), torch.randn(1, 3, 64))


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_identity_rule_on_the_activation(family):
    lm = tiny_model(family)
    act = lm.block_part(0, "mlp_act_fn")
    x = torch.randn(4, 128)
    x[0, 0] = 0.0  # the stabiliser's sign at 0
    c = torch.randn(4, 128)
    y, grad = _grad_through(act, _activation_hook(1e-6), x, c)
    assert torch.allclose(y, act(x))
    assert torch.allclose(grad, c * act(x) / stabilise(x, 1e-6), atol=1e-5)
    assert stabilise(torch.tensor([0.0, -2.0]), 1e-6).tolist() == pytest.approx([1e-6, -2.000001])


def test_half_rule_halves_each_factor_of_the_gated_product():
    lm = tiny_model("qwen2")
    mlp = lm.blocks[0].mlp
    x, c = torch.randn(3, 64), torch.randn(3, 64)
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, a: (half_rule(a[0]),))
    try:
        xg = x.clone().requires_grad_(True)
        y = mlp(xg)
        (grad,) = torch.autograd.grad((y * c).sum(), xg)
    finally:
        handle.remove()
    assert torch.allclose(y, mlp(x), atol=1e-6)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    upstream = c @ mlp.down_proj.weight  # d/d(g)
    sig = torch.sigmoid(gate)
    dact = sig * (1 + gate * (1 - sig))  # silu'
    want = (0.5 * upstream * up * dact) @ mlp.gate_proj.weight + (
        0.5 * upstream * torch.nn.functional.silu(gate)
    ) @ mlp.up_proj.weight
    assert torch.allclose(grad, want.detach(), atol=1e-5)


def test_ah_rule_detaches_the_pattern():
    q, k, v = (torch.randn(1, 4, 5, 8, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :2].detach().requires_grad_(True), v[:, :2].detach().requires_grad_(True)  # grouped kv heads
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)[None, None]
    out, pattern = detached_pattern_attention(torch.nn.Module(), q, k2, v2, mask, scaling=0.3)
    c = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad((out * c).sum(), (q, k2, v2), allow_unused=True)
    want_pattern = torch.softmax(q @ k2.repeat_interleave(2, 1).transpose(2, 3) * 0.3 + mask, -1)
    assert torch.allclose(pattern, want_pattern.detach(), atol=1e-6)
    assert gq is None and gk is None  # no gradient through the queries and keys
    want_gv = (want_pattern.transpose(2, 3) @ c.transpose(1, 2)).view(1, 2, 2, 5, 8).sum(2)
    assert torch.allclose(gv, want_gv.detach(), atol=1e-5)


def test_ah_rule_refuses_attention_that_bypasses_the_interface(qwen):
    with pytest.raises(ResidlabError, match="does not dispatch"):
        with detached_attention(qwen.model, expected_calls=qwen.num_layers):
            pass  # no forward pass: no attention call reached the rule


def test_relp_hooks_leave_the_model_as_it_was(lm):
    from tests.conftest import hook_keys  # noqa: PLC0415

    before_hooks, before_attn = hook_keys(lm), lm.model.config._attn_implementation
    batch = encode_pairs(lm, PAIRS)
    with torch.no_grad():
        before = lm.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
    with relp_rules(lm, RelpRules()) as applied:
        with torch.no_grad():
            during = lm.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad():
        after = lm.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
    assert len(applied) == 4
    assert torch.equal(before, after)
    real = batch.attention_mask.bool()  # padded positions may differ between attention kernels
    assert torch.allclose(before[real], during[real], atol=1e-4)  # the rules change gradients, not values
    assert hook_keys(lm) == before_hooks and lm.model.config._attn_implementation == before_attn


def _linear_gpt2():
    """A tiny GPT-2 made linear: identity norms, zero queries/keys (a constant causal-mean pattern),
    a linear activation. Patching effects are then exactly first order."""
    lm = tiny_model("gpt2")
    model = lm.model.transformer
    with torch.no_grad():
        for block in model.h:
            block.ln_1, block.ln_2 = torch.nn.Identity(), torch.nn.Identity()
            d = block.attn.c_attn.weight.shape[0]
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
            block.mlp.act = torch.nn.Identity()
        model.ln_f = torch.nn.Identity()
    return lm


def test_atp_relp_and_exact_agree_on_a_linear_model():
    lm = _linear_gpt2()
    batch = encode_pairs(lm, PAIRS)
    names, layers = ["block", "attn", "mlp", "attn_heads", "mlp_act"], list(range(lm.num_layers))
    clean = record_values(lm, batch.clean_ids, batch.attention_mask, names, layers)
    corrupted = record_values(lm, batch.corrupted_ids, batch.attention_mask, names, layers)
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.log_softmax(-1))
    run = PatchRun(batch.corrupted_ids, batch.attention_mask, targets, corrupted.values, clean.values, corrupted.logits)
    shape = unit_shape(lm, clean.values, batch.num_tokens)
    metric = get_metric("logit_diff")
    atp = attribute(lm, run.ids, run.mask, targets, metric, list(clean.values))
    relp = attribute(lm, run.ids, run.mask, targets, metric, list(clean.values), RelpRules())
    # along the input path too: on a linear model the gradient is the same at every point, so this checks
    # where the deltas start (the corrupted run) and that the path changes nothing it should not
    path = InputPath(batch.clean_ids, 3)
    atp_path = attribute(lm, run.ids, run.mask, targets, metric, list(clean.values), path=path)
    relp_path = attribute(lm, run.ids, run.mask, targets, metric, list(clean.values), RelpRules(), path)
    for family in ("resid", "attn", "mlp", "heads", "neurons"):
        sites = site_grid(FAMILIES[family], lm.num_layers, shape)
        exact = exact_effects(lm, run, sites, metric, shape.head_dim)
        assert exact.abs().max() > 1e-2, family
        for attribution in (atp, relp, atp_path, relp_path):
            est = estimated_effects(attribution, clean.values, sites, shape.head_dim)
            assert torch.allclose(est, exact, atol=1e-3, rtol=1e-3), (family, est, exact)


def test_relp_differs_from_atp_on_a_real_nonlinear_model(qwen):
    batch = encode_pairs(qwen, PAIRS)
    layers = list(range(qwen.num_layers))
    clean = record_values(qwen, batch.clean_ids, batch.attention_mask, ["block"], layers)
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.log_softmax(-1))
    metric = get_metric("logit_diff")
    atp = attribute(qwen, batch.corrupted_ids, batch.attention_mask, targets, metric, list(clean.values))
    relp = attribute(qwen, batch.corrupted_ids, batch.attention_mask, targets, metric, list(clean.values), RelpRules())
    assert not torch.allclose(atp.grads[0, "block"], relp.grads[0, "block"])
    real = batch.attention_mask.bool()
    assert torch.allclose(atp.values[0, "block"][real], relp.values[0, "block"][real], atol=1e-4)


def test_route_sends_the_gradient_where_the_switch_says_at_backward_time():
    from residlab.analyses.patching.relp_switch import RuleSwitch, route

    x = torch.tensor([1.0, -2.0], requires_grad=True)
    switch = RuleSwitch(RelpRules(norm=False))
    out = route(x * 2, (x * 3).detach() + (x - x.detach()) * 5, "norm", switch)  # value 2x; rule derivative 5
    assert torch.equal(out.detach(), x.detach() * 2)
    (plain,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    switch.active = RelpRules(norm=True)
    (ruled,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(plain, torch.full((2,), 2.0)) and torch.equal(ruled, torch.full((2,), 5.0))
    assert route(x * 2, x * 7, "norm", None) is not None  # no switch: the rule's tensor itself
    assert torch.equal(route(x * 2, x * 7, "norm", None).detach(), x.detach() * 7)


def test_rule_sets_sharing_one_forward_match_separate_passes(lm):
    """attribute_each's one forward + a backward per rule set gives each set's own gradients (as separate
    attribute() calls do, up to the attention kernel's rounding), and leaves no hook or setting behind."""
    from residlab.analyses.patching import relp_attention
    from residlab.analyses.patching.attribution import attribute_each
    from tests.conftest import hook_keys  # noqa: PLC0415

    before_hooks, before_attn = hook_keys(lm), lm.model.config._attn_implementation
    batch = encode_pairs(lm, PAIRS)
    layers = list(range(lm.num_layers))
    clean = record_values(lm, batch.clean_ids, batch.attention_mask, ["block", "attn", "mlp_act"], layers)
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.log_softmax(-1))
    metric, keys = get_metric("logit_diff"), list(clean.values)
    sets = [RelpRules(), RelpRules(attention=False, gated=False), RelpRules(False, False, False, False)]
    shared = list(attribute_each(lm, batch.corrupted_ids, batch.attention_mask, targets, metric, keys, sets))
    assert len(shared) == 3
    real = batch.attention_mask.bool()
    for rules, together in zip(sets, shared, strict=True):
        alone = attribute(lm, batch.corrupted_ids, batch.attention_mask, targets, metric, keys, rules)
        assert together.rules == alone.rules
        for key in keys:
            scale = alone.grads[key][real].abs().max().clamp_min(1e-6)
            assert (together.grads[key][real] - alone.grads[key][real]).abs().max() <= 1e-4 * scale, (rules, key)
    assert not torch.allclose(shared[0].grads[0, "block"][real], shared[2].grads[0, "block"][real])
    assert hook_keys(lm) == before_hooks and lm.model.config._attn_implementation == before_attn
    assert relp_attention._switch[0] is None
