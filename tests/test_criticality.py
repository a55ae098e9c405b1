import json
import math

import pytest
import torch

from residlab.analyses.common import token_batches, tokenize
from residlab.analyses.criticality import _fitted_factor, _power_law_exponent, analyze_criticality, fresh_copy
from residlab.core.errors import ResidlabError

TEXTS = ["The committee met on Tuesday to discuss the new budget for the public library.", "Rivers carry silt."]


def test_preactivation_and_norm_statistics_match_a_hand_computation(lm):
    fresh = fresh_copy(lm, seed=1)
    result = analyze_criticality(lm, TEXTS[:1], max_tokens=16, fresh=fresh, progress=False)
    tb = next(token_batches(lm, tokenize(lm, TEXTS[:1], 16)))
    with lm.record(range(lm.num_layers), "all", sites=("mlp_pre", "block")) as rec:
        lm.forward(tb.batch)
    for layer in range(lm.num_layers):
        z = rec[layer, "mlp_pre"].float()[0, 1:]
        out = rec[layer, "block"].float()[0, 1:]
        assert result.trained.preact_second_moment[layer] == pytest.approx(float((z**2).mean()), rel=1e-4)
        assert result.trained.preact_variance[layer] == pytest.approx(float(z.var(-1, unbiased=False).mean()), rel=1e-4)
        rms = float((out.norm(dim=-1) / math.sqrt(lm.hidden_size)).mean())
        assert result.trained.residual_rms[layer] == pytest.approx(rms, rel=1e-4)


def test_fresh_copy_is_the_same_architecture_with_new_deterministic_weights(qwen):
    a, b = fresh_copy(qwen, seed=3), fresh_copy(qwen, seed=3)
    assert a.model.config.to_dict() == qwen.model.config.to_dict()
    pa = dict(a.model.named_parameters())
    for name, param in qwen.model.named_parameters():
        assert torch.equal(pa[name], dict(b.model.named_parameters())[name])
        if name.endswith("q_proj.weight"):
            assert not torch.equal(pa[name], param)


def test_fresh_copy_takes_another_initializer_range(qwen):
    wide = fresh_copy(qwen, seed=3, initializer_range=0.5)
    assert wide.model.config.initializer_range == 0.5 and qwen.model.config.initializer_range != 0.5
    std = float(dict(wide.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach().std())
    assert std == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ResidlabError, match="initializer_range"):
        fresh_copy(qwen, initializer_range=-1.0)


def test_perturbation_gain_is_in_the_linear_regime(qwen):
    fresh = fresh_copy(qwen)
    small = analyze_criticality(qwen, TEXTS, max_tokens=12, eps=1e-4, fresh=fresh, progress=False)
    smaller = analyze_criticality(qwen, TEXTS, max_tokens=12, eps=1e-5, fresh=fresh, progress=False)
    for a, b in zip(small.trained.perturbation_gain, smaller.trained.perturbation_gain, strict=True):
        assert a == pytest.approx(b, rel=0.02)
    # layer 0's block output moves by about eps relative to its input (plus what the block adds)
    assert 0.1 < small.trained.perturbation_gain[0] < 10


def test_result_files_summary_and_fits(qwen, tmp_path):
    result = analyze_criticality(qwen, TEXTS, max_tokens=12, progress=False)
    s = result.summary()
    assert {"trained_preact_factor_per_layer", "fresh_residual_rms_power_law_exponent"} <= set(s)
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"criticality.json", "criticality.png"}
    data = json.loads((tmp_path / "criticality.json").read_text())
    assert len(data["fresh"]["growth"]) == qwen.num_layers
    assert _fitted_factor([2.0, 4.0, 8.0]) == pytest.approx(2.0)
    assert _power_law_exponent([1.0, 2**0.5, 3**0.5, 2.0]) == pytest.approx(0.5)
    with pytest.raises(ResidlabError, match="eps"):
        analyze_criticality(qwen, TEXTS, eps=0.0, progress=False)
