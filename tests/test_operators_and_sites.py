"""Steering operators beyond addition, checked against hand computations, and sub-block sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPTS, hook_keys, random_vector

from residlab import ResidlabError
from residlab.interventions.operators import OPERATORS
from residlab.models.architectures import get_module
from residlab.testing import tiny_model


def _by_hand(name: str, h: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    """The operator's formula on one activation, in float64, written out independently."""
    unit = v / np.linalg.norm(v)
    if name == "add":
        return h + s * v
    if name == "project_out":
        return h - (h @ v) / (v @ v) * v
    if name == "add_norm_preserving":
        steered = h + s * v
        return steered * np.linalg.norm(h) / np.linalg.norm(steered)
    if name == "clamp":
        return h - (h @ unit) * unit + s * v
    raise AssertionError(name)


def _block_output(lm, prompts, layer=1, **steer):
    with lm.record(layers=[layer], positions="all") as plain:
        lm.forward(prompts)
    if not steer:
        return plain[layer]
    with lm.steer(**steer), lm.record(layers=[layer], positions="all") as rec:
        lm.forward(prompts)
    return plain[layer], rec[layer]


@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("strength", [2.5, -1.5])
def test_each_operator_matches_its_formula(qwen, operator, strength):
    vec = random_vector(qwen, [1], scale=1.0)
    plain, steered = _block_output(qwen, PROMPTS, vector=vec, strength=strength, positions="all", operator=operator)
    real = qwen.encode(PROMPTS).attention_mask.bool()
    v = vec.directions[1].double().numpy()
    for row, col in real.nonzero().tolist():
        h = plain[row, col].double().numpy()
        np.testing.assert_allclose(steered[row, col].double().numpy(), _by_hand(operator, h, v, strength), atol=2e-5)
    assert torch.equal(steered[~real], plain[~real])  # padding is never steered
    unit = vec.directions[1] / vec.directions[1].norm()
    on_v = steered[real] @ unit
    if operator == "project_out":
        torch.testing.assert_close(on_v, torch.zeros_like(on_v), atol=1e-5, rtol=0)
    if operator == "clamp":
        torch.testing.assert_close(on_v, torch.full_like(on_v, strength * float(vec.norm())), atol=1e-5, rtol=0)
    if operator == "add_norm_preserving":
        torch.testing.assert_close(steered[real].norm(dim=-1), plain[real].norm(dim=-1))


@pytest.mark.parametrize("operator", sorted(OPERATORS))
def test_operators_respect_positions_rows_and_strength_zero(qwen, operator):
    vec = random_vector(qwen, [1])
    plain = qwen.forward(PROMPTS)
    with qwen.steer(vec, strength=0.0, positions="all", operator=operator):
        assert torch.equal(qwen.forward(PROMPTS), plain)
    with qwen.steer(vec, strength=2.0, positions="generated", operator=operator):
        assert torch.equal(qwen.forward(PROMPTS), plain)  # a plain forward is all prompt
    with qwen.steer(vec, strength=[0.0, 2.0, 0.0], positions="all", operator=operator):
        mixed = qwen.forward(PROMPTS)
    assert torch.equal(mixed[[0, 2]], plain[[0, 2]]) and not torch.allclose(mixed[1], plain[1])
    with qwen.steer(vec, strength=2.0, operator=operator):
        cached = qwen.generate(PROMPTS, max_new_tokens=5, chat=False)
        uncached = qwen.generate(PROMPTS, max_new_tokens=5, chat=False, use_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]


def test_a_custom_operator_is_a_plain_function(qwen):
    vec = random_vector(qwen, [1])

    def double(hidden, delta, mask):
        return hidden + 2 * mask * delta

    with qwen.steer(vec, strength=1.0, positions="all", operator=double):
        custom = qwen.forward(PROMPTS)
    with qwen.steer(vec, strength=2.0, positions="all"):
        torch.testing.assert_close(custom, qwen.forward(PROMPTS))
    with pytest.raises(ResidlabError, match="unknown steering operator 'ablate'"):
        qwen.steer(vec, operator="ablate")


def test_steering_the_next_blocks_input_equals_steering_this_blocks_output(lm):
    vec = random_vector(lm, [1])
    with lm.steer(vec, positions="all"):
        at_output = lm.forward(PROMPTS)
    moved = type(vec).from_layers({2: vec.directions[1]}, model=lm)
    with lm.steer(moved, positions="all", site="block_input"):
        assert torch.equal(lm.forward(PROMPTS), at_output)


@pytest.mark.parametrize("site, part", [("mlp", "mlp"), ("attn", "attn"), ("input_norm", "input_norm")])
def test_sub_block_steering_equals_a_bare_hook_on_the_module(qwen, site, part):
    vec = random_vector(qwen, [1])
    module = get_module(qwen.blocks[1], getattr(qwen.arch, part))

    def by_hand(mod, args, output):
        if isinstance(output, tuple):
            return (output[0] + vec.directions[1], *output[1:])
        return output + vec.directions[1]

    handle = module.register_forward_hook(by_hand)
    try:
        expected = qwen.forward(PROMPTS[:1])
    finally:
        handle.remove()
    before = hook_keys(qwen)
    with qwen.steer(vec, positions="all", site=site):
        got = qwen.forward(PROMPTS[:1])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, qwen.forward(PROMPTS[:1]))
    assert hook_keys(qwen) == before


def test_sites_a_family_lacks_or_that_have_another_width_are_refused(qwen):
    vec = random_vector(qwen, [1])
    with pytest.raises(ResidlabError, match="has no post_attn_norm module: the family has none"):
        with qwen.steer(vec, site="post_attn_norm"):
            pass
    with pytest.raises(ResidlabError, match="MLP's hidden width"):
        qwen.steer(vec, site="mlp_act")
    with pytest.raises(ResidlabError, match="unknown steering site 'resid_mid'"):
        qwen.steer(vec, site="resid_mid")
    assert qwen.tracker._users == 0


def test_norm_sites_record_what_the_branches_read(lm):
    arch = lm.arch
    sites = ["block_input", "input_norm", "pre_mlp_norm", "attn", "mlp", "block"]
    if arch.sandwich_norms:
        sites += ["post_attn_norm", "post_mlp_norm"]
    with lm.record(layers=[1], positions="all", sites=sites) as rec:
        lm.forward(PROMPTS[:1])
    block = lm.blocks[1]
    with torch.inference_mode():
        torch.testing.assert_close(rec[1, "input_norm"], get_module(block, arch.input_norm)(rec[1, "block_input"]))
        if arch.parallel_residual:
            expected_mlp_in = get_module(block, arch.pre_mlp_norm)(rec[1, "block_input"])
        else:
            attn_added = rec[1, "post_attn_norm"] if arch.sandwich_norms else rec[1, "attn"]
            expected_mlp_in = get_module(block, arch.pre_mlp_norm)(rec[1, "block_input"] + attn_added)
        torch.testing.assert_close(rec[1, "pre_mlp_norm"], expected_mlp_in, rtol=1e-4, atol=1e-5)
    if arch.sandwich_norms:  # Gemma 3: what is added to the residual is the post-normed branch
        torch.testing.assert_close(
            rec[1, "block"], rec[1, "block_input"] + rec[1, "post_attn_norm"] + rec[1, "post_mlp_norm"]
        )


def test_post_norm_sites_steer_on_gemma():
    gemma = tiny_model("gemma3")
    vec = random_vector(gemma, [1])
    plain = gemma.forward(PROMPTS)
    for site in ("post_attn_norm", "post_mlp_norm", "pre_mlp_norm"):
        with gemma.steer(vec, positions="all", site=site):
            assert not torch.allclose(gemma.forward(PROMPTS), plain), site


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "gpt_neox", "phi", "olmo"])
def test_head_and_pre_activation_sites_rebuild_the_branch_outputs(family):
    """``attn_heads`` is what attention's output projection reads and ``mlp_pre`` what the activation reads:
    pushing them through the mapped modules gives back the recorded attention and MLP outputs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = tiny_model(family)
    arch, block, config = lm.arch, lm.block_part(1, ""), lm.model.config
    sites = ("attn_heads", "attn", "mlp_pre", "mlp", "pre_mlp_norm")
    with torch.inference_mode():  # lm.forward runs in inference mode; so must the modules fed its tensors
        with lm.record(layers=[1], positions="all", sites=sites) as rec:
            lm.forward(PROMPTS[:2])
        heads, mlp_input = rec[1, "attn_heads"], rec[1, "pre_mlp_norm"]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        assert heads.shape[-1] == config.num_attention_heads * head_dim
        torch.testing.assert_close(get_module(block, arch.attn_out)(heads), rec[1, "attn"])
        torch.testing.assert_close(get_module(block, arch.mlp_in)(mlp_input), rec[1, "mlp_pre"])
        hidden = get_module(block, arch.mlp_act_fn)(rec[1, "mlp_pre"])
        if arch.mlp_up:
            hidden = hidden * get_module(block, arch.mlp_up)(mlp_input)
        torch.testing.assert_close(get_module(block, arch.mlp_down)(hidden), rec[1, "mlp"])
