"""Activation codes and activation swaps on tiny models, against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from residlab.analyses.activation_swaps import (
    ActivationSwap,
    _Moments,
    analyze_activations,
    crrelu_with,
    observe_activations,
    resolve_activation,
)
from residlab.analyses.codes import (
    ambiguous_fraction,
    analyze_codes,
    collect_codes,
    hamming_distances,
    knn_predict,
    redundancy_ratio,
)
from residlab.analyses.heldout import batches_of, heldout_loss
from residlab.core.errors import ResidlabError
from tests.conftest import hook_keys

TEXTS = [
    "The cat sat on the mat and looked at the dog.",
    "Paris is the capital of France and a large city.",
    "Water boils at one hundred degrees at sea level.",
    "The dog ran after the cat across the garden.",
]

# ------------------------------------------------------------------------------------------ codes


def test_redundancy_and_ambiguity_by_hand():
    codes = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=bool)
    assert redundancy_ratio(codes) == pytest.approx(1 / 4)  # 4 tokens, 3 distinct codes
    assert ambiguous_fraction(codes, np.array([5, 5, 6, 7])) == 0.0  # the shared code has one label
    assert ambiguous_fraction(codes, np.array([5, 6, 6, 7])) == pytest.approx(2 / 4)
    assert math.isnan(redundancy_ratio(np.zeros((0, 3), dtype=bool)))


def test_hamming_distances_match_counting_differing_bits():
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 37)) < 0.4, rng.random((7, 37)) < 0.6
    expected = (a[:, None, :] != b[None, :, :]).sum(-1)
    assert torch.equal(hamming_distances(torch.from_numpy(a), torch.from_numpy(b)).long(), torch.from_numpy(expected))


def test_knn_majority_vote_and_ties_by_hand():
    # k = 3: query 0's nearest labels [7, 3, 3] -> 3, query 1's [7, 3, 7] -> 7; k = 2: [7, 3] tie -> 3
    distances = torch.tensor([[0.0, 1.0, 2.0, 9.0], [0.0, 1.0, 5.0, 4.0]])
    labels = torch.tensor([7, 3, 3, 7])
    assert knn_predict(distances, labels, 3).tolist() == [3, 7]
    tied = torch.tensor([[0.0, 1.0, 5.0, 5.0]])  # keys 2 and 3 tie: the first (label 3) is nearer
    assert knn_predict(tied, labels, 3).tolist() == [3]
    assert knn_predict(distances, labels, 2).tolist() == [3, 3]
    assert knn_predict(distances, labels, 1).tolist() == [7, 7]
    assert knn_predict(distances, labels, 99).tolist() == [3, 3]  # k capped at the keys: 2 votes each


def test_codes_are_the_sign_of_the_gate_computed_by_hand(qwen):
    layer = 1
    got = collect_codes(
        qwen, TEXTS[:1], [layer], max_tokens=16, batch_size=1, first_position=1, desc="", progress=False
    )
    with qwen.record([layer], positions="all", sites=("pre_mlp_norm",)) as rec:
        qwen.forward(TEXTS[:1])
    normed = rec[layer, "pre_mlp_norm"][0, 1:16]  # positions 1..15 (one text: no padding)
    gate = qwen.block_part(layer, "mlp_in").weight.detach()
    expected = (normed @ gate.T > 0).numpy()
    assert np.array_equal(got.codes(layer, got.bits), expected)
    assert got.labels("current").tolist() == qwen.tokenizer(TEXTS[0])["input_ids"][1:16]


def test_analyze_codes_on_train_texts_finds_each_token_at_distance_zero(qwen, tmp_path):
    # Test texts = train texts, k = 1: every token's nearest code is its own (or an identical code), so
    # the accuracy is at least the share of tokens whose code no other token id shares.
    r = analyze_codes(qwen, TEXTS, TEXTS, k=1, top_classes=200, max_tokens=24, progress=False)
    assert (
        r.layers == [0, 1, 2] and r.train_tokens == r.test_tokens > 20 and r.bits == qwen.model.config.intermediate_size
    )
    for i in range(3):
        assert r.knn["current"][i] >= 1 - r.ambiguous[i] - 1e-9
        assert 0 <= r.redundancy[i] <= r.ambiguous[i] + 1 and 0 < r.firing_rate[i] < 1
    assert r.coverage["current"] == 1.0
    paths = r.save(tmp_path)
    assert {p.name for p in paths} == {"codes.json", "codes_uniqueness.png", "codes_accuracy.png"}


def test_analyze_codes_rejects_bad_options(qwen):
    with pytest.raises(ResidlabError, match="top_classes"):
        analyze_codes(qwen, TEXTS, TEXTS, top_classes=1, progress=False)


# ------------------------------------------------------------------------------------------ activation swaps


def test_crrelu_by_hand():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    e = math.exp(-0.5)
    expected = torch.tensor([-0.01 * e, 0.0, 1 + 0.01 * e, 3 + 0.03 * math.exp(-4.5)])
    assert torch.allclose(resolve_activation("crrelu")[1](x), expected)
    assert torch.allclose(crrelu_with(0.5)(x)[0], torch.tensor(-0.5 * e))
    assert resolve_activation(torch.tanh)[0] == "tanh"
    with pytest.raises(ResidlabError, match="unknown activation"):
        resolve_activation("swishy")


def test_swapping_in_the_models_own_function_changes_nothing_and_leaves_no_hook(qwen):
    batches = batches_of(qwen, TEXTS, 24, 2)
    before, keys = heldout_loss(qwen, batches, progress=False), hook_keys(qwen)
    with ActivationSwap(qwen, F.silu, range(3)):  # the tiny qwen2's own activation
        same = heldout_loss(qwen, batches, progress=False)
    with ActivationSwap(qwen, F.relu, range(3)):
        assert hook_keys(qwen) != keys
        changed = heldout_loss(qwen, batches, progress=False)
    assert same.ce == pytest.approx(before.ce, abs=1e-6) and abs(changed.ce - before.ce) > 1e-4
    assert hook_keys(qwen) == keys and heldout_loss(qwen, batches, progress=False).ce == before.ce


def test_swap_at_one_layer_matches_relu_of_the_gate_times_up(qwen):
    with ActivationSwap(qwen, F.relu, [1], {1: 2.0}):
        with qwen.record([0, 1], positions="all", sites=("pre_mlp_norm", "mlp_act")) as rec:
            qwen.forward(TEXTS[:1])
    for layer, fn in ((0, F.silu), (1, lambda z: 2.0 * F.relu(z))):
        x = rec[layer, "pre_mlp_norm"]
        gate, up = qwen.block_part(layer, "mlp_in").weight.detach(), qwen.block_part(layer, "mlp_up").weight.detach()
        assert torch.allclose(rec[layer, "mlp_act"], fn(x @ gate.T) * (x @ up.T), atol=1e-5)


def test_moments_and_calibrated_scale_by_hand():
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    f, g = F.relu(x), F.silu(x)
    m = _Moments(1)
    m.add(0, f, g)
    stats = m.stats()
    assert stats["zero_fraction"][0] == 0.5 and stats["mean"][0] == pytest.approx(float(f.mean()))
    assert stats["std"][0] == pytest.approx(float(f.std(unbiased=False)))
    assert stats["rel_deviation"][0] == pytest.approx(float((f - g).norm() / g.norm()))
    assert m.scales()[0] == pytest.approx(float((f * g).sum() / (f * f).sum()))


def test_observed_relu_zeros_are_the_non_positive_pre_activations(qwen):
    batches = batches_of(qwen, TEXTS, 24, 4)
    pre, _, cands = observe_activations(qwen, batches, {"relu": F.relu}, [0, 2], first_position=1, progress=False)
    with qwen.record([0, 2], positions="all", sites=("mlp_pre",)) as rec:
        from residlab.analyses.common import run_decoder

        run_decoder(qwen, batches[0])
    valid = batches[0].valid(1)
    for i, layer in enumerate([0, 2]):
        assert cands["relu"].stats()["zero_fraction"][i] == pytest.approx(
            float((rec[layer, "mlp_pre"][valid] <= 0).double().mean())
        )
    assert pre.sums[0, 0] == valid.sum() * qwen.model.config.intermediate_size


def test_analyze_activations_reports_every_swap_and_calibrates_on_train_texts(lm, tmp_path):
    r = analyze_activations(
        lm,
        TEXTS[:2],
        TEXTS[2:],
        activations=("relu", "crrelu", torch.tanh),
        layers=[0, 1],
        calibrate=True,
        max_tokens=16,
        progress=False,
    )
    assert [s.name for s in r.swaps] == ["relu", "crrelu", "tanh"] and r.layers == [0, 1] and r.train_texts == 2
    for s in r.swaps:
        assert s.delta_ce == pytest.approx(s.ce - r.baseline_ce) and len(s.scales) == 2
        assert s.calibrated_delta_ce is not None and len(s.rel_deviation) == 2
    assert {p.name for p in r.save(tmp_path)} == {"activations.json", "activations_loss.png", "activations_stats.png"}
    with pytest.raises(ResidlabError, match="train texts"):
        analyze_activations(lm, TEXTS, (), calibrate=True, progress=False)
