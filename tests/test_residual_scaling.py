import json
import math

import pytest
import torch

from residlab.analyses.common import final_norm, token_batches, tokenize, unembed
from residlab.analyses.residual_scaling import (
    GPT2_XL_GROWTH,
    analyze_residual,
    branch_scaling,
    depth_ranges,
    mean_ce,
)
from residlab.core.errors import ResidlabError

TEXT = "The committee met on Tuesday to discuss the new budget for the public library and its branches."


def test_norm_ratios_match_a_hand_computation(lm):
    result = analyze_residual(lm, [TEXT], max_tokens=16, alphas=(), range_alphas=(), progress=False)
    ids = tokenize(lm, [TEXT], 16)
    tb = next(token_batches(lm, ids))
    with lm.record(range(lm.num_layers), "all", sites=("block_input", "block")) as rec:
        lm.forward(tb.batch)
    for layer in range(lm.num_layers):
        h = rec[layer, "block_input"].float()[0, 1:]  # position 0 excluded
        out = rec[layer, "block"].float()[0, 1:]
        assert result.skip_norm[layer] == pytest.approx(float(h.norm(dim=-1).mean()), rel=1e-4)
        assert result.growth[layer] == pytest.approx(float((out.norm(dim=-1) / h.norm(dim=-1)).mean()), rel=1e-4)
        block = float(((out - h).norm(dim=-1) / h.norm(dim=-1)).mean())
        assert result.block_ratio[layer] == pytest.approx(block, rel=1e-4)
    assert result.num_tokens == len(ids[0]) - 1


def test_alpha_zero_leaves_only_the_embedding_and_alpha_one_is_the_model(lm):
    tb = list(token_batches(lm, tokenize(lm, [TEXT], 12)))
    baseline = mean_ce(lm, tb)
    assert mean_ce(lm, tb, lambda: branch_scaling(lm, range(lm.num_layers), 1.0)) == pytest.approx(baseline, rel=1e-6)
    zero = mean_ce(lm, tb, lambda: branch_scaling(lm, range(lm.num_layers), 0.0))
    # by hand: with every branch zeroed the last residual is the embedding (scaled as the family does)
    with lm.record([0], "all", sites=("block_input",)) as rec:
        lm.forward(tb[0].batch)
    emb = rec[0, "block_input"][0]
    logp = torch.log_softmax(unembed(lm, final_norm(lm, emb)), -1)
    ids = tb[0].batch.input_ids[0]
    hand = float(-logp[:-1].gather(1, ids[1:, None]).mean())
    assert zero == pytest.approx(hand, rel=1e-4)


def test_scaling_one_range_changes_only_later_states(qwen):
    tb = next(token_batches(qwen, tokenize(qwen, [TEXT], 12)))
    with qwen.record(range(qwen.num_layers), "all") as clean:
        qwen.forward(tb.batch)
    with branch_scaling(qwen, [1], 0.5)[0], branch_scaling(qwen, [1], 0.5)[1]:
        with qwen.record(range(qwen.num_layers), "all") as edited:
            qwen.forward(tb.batch)
    assert torch.equal(clean[0, "block"], edited[0, "block"])
    assert not torch.allclose(clean[1, "block"], edited[1, "block"])


def test_sweep_result_files_and_summary(qwen, tmp_path):
    result = analyze_residual(
        qwen, [TEXT, TEXT[::-1]], max_tokens=12, alphas=(0, 1, 0.2), range_alphas=(0.5,), ranges=2, progress=False
    )
    names = [c.name for c in result.sweeps]
    assert names == ["all", "early", "late"]
    assert result.sweeps[0].alphas == [0.0, 0.2, 1.0] and result.sweeps[0].ce[-1] == result.baseline_ce
    s = result.summary()
    assert s["gpt2_xl_growth_per_layer"] == GPT2_XL_GROWTH and math.isfinite(s["fitted_growth_per_layer"])
    assert s["ce_in_inception_range_all"] == result.sweeps[0].ce[1]
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"residual.json", "residual_ratios.png", "residual_alpha_sweep.png"}
    assert json.loads((tmp_path / "residual.json").read_text())["sweeps"][1]["stop"] == result.sweeps[2].start


def test_fitted_growth_is_exact_on_geometric_norms(qwen):
    result = analyze_residual(qwen, [TEXT], max_tokens=8, alphas=(), range_alphas=(), progress=False)
    n = result.num_layers
    fake = type(result)(
        **{**result.__dict__, "skip_norm": [1.3**i for i in range(n)], "out_norm": [1.3 ** (i + 1) for i in range(n)]}
    )
    assert fake.fitted_growth() == pytest.approx(1.3)


def test_depth_ranges_and_bad_alphas(qwen):
    assert depth_ranges(24, 3) == [("early", 0, 8), ("middle", 8, 16), ("late", 16, 24)]
    assert depth_ranges(2, 3) == [("early", 0, 1), ("late", 1, 2)]
    with pytest.raises(ResidlabError, match="finite"):
        analyze_residual(qwen, [TEXT], alphas=(float("nan"),), progress=False)
