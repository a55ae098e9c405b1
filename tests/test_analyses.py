"""Edits, layer skipping and the residual-stream analyses, each checked against a hand computation."""

import copy
import json
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import pytest
import torch
from conftest import PROMPTS, hook_keys, random_vector

from residlab import LanguageModel, ResidlabError, SteeringVector
from residlab.analyses import (
    CETTCurve,
    analyze_depth,
    analyze_dims,
    analyze_sparsity,
    bisect_increasing,
    cett,
    logit_lens,
    read_texts,
    top_tokens,
)
from residlab.analyses.common import TokenBatch, down_matrix, next_token_nll, run_decoder, token_batches, tokenize
from residlab.analyses.depth import DepthResult, branch_contributions
from residlab.analyses.dims import DimsResult, gaussian_fraction, mass_fraction, top_k_jaccard
from residlab.analyses.means import LayerMeans, halves
from residlab.analyses.result import AnalysisResult, figure
from residlab.analyses.sparsity import SparsityResult
from residlab.models.architectures import get_module
from residlab.testing import tiny_config, tiny_tokenizer

TEXTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "How many clips did she sell?",
    "Weng earns $12 an hour for babysitting.",
]


def _batch(lm, texts=TEXTS) -> TokenBatch:
    (tb,) = token_batches(lm, tokenize(lm, texts), batch_size=len(texts))
    return tb


def _relu_llama() -> LanguageModel:
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config("llama", len(tokenizer))
    config.hidden_act = "relu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LanguageModel(model, tokenizer, name="tiny-relu-llama", source="testing")


# ------------------------------------------------------------------------------------------ shared pieces


@dataclass(frozen=True)
class _Toy(AnalysisResult):
    json_file: ClassVar[str] = "toy.json"

    name: str
    curve: list[float]

    def summary(self) -> dict[str, Any]:
        return {"first": self.curve[0]}

    def derived(self) -> dict[str, Any]:
        return {"doubled": [2 * v for v in self.curve]}

    @figure("toy_curve.png")
    def _curve(self, plt):
        fig, ax = plt.subplots()
        ax.plot(self.curve)
        return fig

    @figure("toy_optional.png")
    def _optional(self, plt):
        return None  # nothing to draw: left out


@dataclass(frozen=True)
class _MoreToy(_Toy):
    json_file: ClassVar[str] = "more.json"

    extra: int = 0

    @figure("more_extra.png")
    def _extra(self, plt):
        return plt.subplots()[0]


def test_analysis_result_base_writes_fields_derived_and_summary_and_each_figure(tmp_path):
    toy = _Toy("t", [float("nan"), 1.5])
    data = toy.to_dict()
    assert list(data) == ["name", "curve", "doubled", "summary"]
    assert math.isnan(data["summary"]["first"]) and data["doubled"][1] == 3.0
    assert [p.name for p in toy.save(tmp_path)] == ["toy.json", "toy_curve.png"]  # the None figure is left out
    text = (tmp_path / "toy.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON")) == {
        "name": "t",
        "curve": [None, 1.5],
        "doubled": [None, 3.0],
        "summary": {"first": None},
    }
    assert (tmp_path / "toy_curve.png").read_bytes()[:4] == b"\x89PNG"
    more = _MoreToy("m", [1.0], extra=2)
    assert list(more.to_dict()) == ["name", "curve", "extra", "doubled", "summary"]
    assert [p.name for p in more.save(tmp_path / "more")] == ["more.json", "toy_curve.png", "more_extra.png"]
    with pytest.raises(TypeError, match="summary"):

        @dataclass(frozen=True)
        class NoSummary(AnalysisResult):
            json_file: ClassVar[str] = "x.json"

        NoSummary()


def test_result_classes_keep_their_file_names():
    assert (DepthResult.json_file, list(DepthResult.figures.values())) == (
        "depth.json",
        ["depth_contributions.png", "depth_logit_lens.png", "depth_skip_effect.png"],
    )
    assert (DimsResult.json_file, list(DimsResult.figures.values())) == ("dims.json", ["dims_concentration.png"])
    assert (SparsityResult.json_file, list(SparsityResult.figures.values())) == (
        "sparsity.json",
        ["sparsity_nonzero.png", "sparsity_cett.png", "sparsity_temporal.png"],
    )


def test_layer_means_pool_batches_and_counts():
    means = LayerMeans(3)
    means.add(0, torch.tensor([1.0, 2.0]))
    means.add(0, torch.tensor([6.0]))  # pooled over elements, not a mean of batch means
    means.add(1, torch.tensor([True, False, False, True]))  # a fraction of hits
    means.add_sum(1, 3, 4)
    got = means.means()
    assert got[:2] == [3.0, 5 / 8] and math.isnan(got[2])  # layer 2 saw nothing
    first, second = halves([float("nan"), 1.0, 2.0, None, 4.0])  # NaN and None are ignored
    assert (first, second) == (1.0, 3.0)


def test_token_batches_are_lm_pad_batches_sorted_by_length(qwen):
    rows = [[5, 6, 7], [], [8], [9, 10, 11, 12], [13, 14]]
    batches = list(token_batches(qwen, rows, batch_size=2))
    assert [tb.rows for tb in batches] == [(2, 4), (0, 3)]  # shortest first; the empty row is left out
    pad = qwen.pad_token_id
    assert torch.equal(batches[0].batch.input_ids, torch.tensor([[pad, 8], [13, 14]]))
    assert torch.equal(batches[0].batch.attention_mask, torch.tensor([[0, 1], [1, 1]]))
    assert torch.equal(batches[1].batch.input_ids, torch.tensor([[pad, 5, 6, 7], [9, 10, 11, 12]]))
    assert torch.equal(batches[1].positions, torch.tensor([[-1, 0, 1, 2], [0, 1, 2, 3]]))
    for tb in batches:
        same = qwen.pad([rows[i] for i in tb.rows])
        assert torch.equal(tb.batch.input_ids, same.input_ids)
        assert torch.equal(tb.batch.attention_mask, same.attention_mask)


# ------------------------------------------------------------------------------------------ edits


def test_identity_edit_is_bit_identical_and_hooks_are_removed(lm):
    plain = lm.forward(PROMPTS)
    before = hook_keys(lm)
    for site in ("block", "attn", "mlp", "block_input", "mlp_act"):
        with lm.edit([0, 2], site, lambda value, ctx: value):
            assert len(hook_keys(lm) - before) == 3  # two edited modules + the position tracker
            assert torch.equal(lm.forward(PROMPTS), plain)
        assert hook_keys(lm) == before
    with pytest.raises(RuntimeError, match="boom"), lm.skip([1]):
        raise RuntimeError("boom")
    assert hook_keys(lm) == before and lm.tracker._users == 0


def test_zeroing_the_mlp_activation_equals_zeroing_the_mlp_output_but_its_bias(lm):
    down = get_module(lm.blocks[1], lm.arch.mlp_down)
    bias = down.bias if getattr(down, "bias", None) is not None else torch.zeros(lm.hidden_size)
    with lm.edit(1, "mlp_act", lambda value, ctx: torch.zeros_like(value)):
        via_act = lm.forward(PROMPTS)
    with lm.edit(1, "mlp", lambda value, ctx: torch.zeros_like(value) + bias.detach()):
        via_out = lm.forward(PROMPTS)
    torch.testing.assert_close(via_act, via_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(via_act, lm.forward(PROMPTS))


def test_edit_sees_real_positions_and_leaves_earlier_tokens_alone(qwen):
    seen = []

    def late_only(value, ctx):
        seen.append(ctx.positions.clone())
        return torch.where((ctx.positions >= 3).unsqueeze(-1), value * 2.0, value)

    tb = _batch(qwen)
    plain = qwen.forward(tb.batch)
    with qwen.edit(0, "block", late_only):
        edited = qwen.forward(tb.batch)
    assert torch.equal(seen[0], tb.positions)
    early = (tb.positions >= 0) & (tb.positions < 3)
    assert torch.equal(edited[early], plain[early])
    assert not torch.allclose(edited[tb.positions >= 3], plain[tb.positions >= 3])


def test_edit_errors(qwen):
    with pytest.raises(ResidlabError, match="unknown edit site"):
        qwen.edit(0, "resid", lambda v, c: v)
    with pytest.raises(ResidlabError, match="output site"):
        qwen.edit(0, "mlp_act", lambda v, c, i: v, with_input=True)
    with pytest.raises(ResidlabError, match="layer 9 does not exist"):
        qwen.edit(9, "block", lambda v, c: v)
    with pytest.raises(ResidlabError, match="no edit function for layer 2"):
        qwen.edit([1, 2], "block", {1: lambda v, c: v})
    with pytest.raises(ResidlabError, match="expected shape"):
        with qwen.edit(0, "block", lambda v, c: v[:, :1]):
            qwen.forward(PROMPTS)
    assert qwen.tracker._users == 0


# ------------------------------------------------------------------------------------------ skipping


def test_skip_changes_nothing_before_and_copies_the_input(lm):
    tb = _batch(lm)
    layers = range(lm.num_layers)
    with lm.record(layers, "all", sites=("block_input", "block")) as base:
        lm.forward(tb.batch)
    with lm.skip([1]), lm.record(layers, "all", sites=("block_input", "block")) as skipped:
        lm.forward(tb.batch)
    real, later = tb.positions >= 0, tb.positions >= 1
    assert torch.equal(skipped[0][real], base[0][real])  # the layer before the skipped one: untouched
    assert torch.equal(skipped[1, "block_input"][real], base[1, "block_input"][real])
    assert torch.equal(skipped[1][later], skipped[1, "block_input"][later])  # output := input from position 1
    first = tb.positions == 0
    assert torch.equal(skipped[1][first], base[1][first])  # position 0 is left alone
    assert not torch.allclose(skipped[2][later], base[2][later])


def test_skipping_everywhere_equals_the_model_without_that_block(lm):
    """By hand: a copy of the model whose block list lacks block 1."""
    shorter = copy.deepcopy(lm.model)
    del get_module(shorter, lm.arch.blocks)[1]
    shorter.config.num_hidden_layers -= 1
    if getattr(shorter.config, "layer_types", None):
        shorter.config.layer_types = [t for i, t in enumerate(shorter.config.layer_types) if i != 1]
    expected = LanguageModel(shorter, lm.tokenizer, name="shorter").forward(PROMPTS)
    with lm.skip([1], from_position=0):
        got = lm.forward(PROMPTS)
    real = lm.encode(PROMPTS).attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ logit lens


def test_logit_lens_of_the_last_layer_is_the_output(lm):
    tb = _batch(lm)
    with lm.record([lm.num_layers - 1], "all") as rec:
        logits = lm.forward(tb.batch)
    real = tb.positions >= 0
    torch.testing.assert_close(logit_lens(lm, rec[lm.num_layers - 1])[real], logits[real], rtol=1e-5, atol=1e-5)
    assert run_decoder(lm, tb).shape == rec[lm.num_layers - 1].shape


def test_logit_lens_by_hand_and_top_tokens(qwen):
    h = torch.randn(5, qwen.hidden_size, generator=torch.Generator().manual_seed(1))
    norm = get_module(qwen.model, qwen.arch.final_norm)
    unembed = get_module(qwen.model, qwen.arch.unembed).weight.detach()
    by_hand = (
        h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.detach()
    ) @ unembed.T
    torch.testing.assert_close(logit_lens(qwen, h), by_hand, rtol=1e-4, atol=1e-4)
    top = top_tokens(qwen, h[0], k=4)
    values, ids = by_hand[0].topk(4)
    assert [t for t, _ in top] == [qwen.tokenizer.decode([i]) for i in ids.tolist()]
    assert [s for _, s in top] == pytest.approx(values.tolist(), abs=1e-4)
    bottom = top_tokens(qwen, h[0], k=2, largest=False)
    assert [s for _, s in bottom] == pytest.approx(by_hand[0].topk(2, largest=False).values.tolist(), abs=1e-4)
    vec = SteeringVector.from_tensor(h[0], model=qwen, layer=1)
    assert top_tokens(qwen, vec, k=4) == top
    with pytest.raises(ResidlabError, match="say which one"):
        top_tokens(qwen, random_vector(qwen, [0, 1]))
    with pytest.raises(ResidlabError, match="hidden size"):
        logit_lens(qwen, torch.zeros(3))


# ------------------------------------------------------------------------------------------ depth


def test_branch_contributions_add_up_to_the_block(lm):
    with lm.record(range(lm.num_layers), "all", sites=("block_input", "attn", "mlp", "block")) as rec:
        lm.forward(PROMPTS)
    for layer in range(lm.num_layers):
        a, m = branch_contributions(lm, layer, rec[layer, "attn"], rec[layer, "mlp"])
        torch.testing.assert_close(rec[layer, "block_input"] + a + m, rec[layer], rtol=1e-4, atol=1e-4)


def test_depth_against_a_hand_computation(qwen):
    text = [TEXTS[0]]  # one text: no padding, so per-token averages are plain means
    result = analyze_depth(qwen, text)
    n = qwen.num_layers
    layers = range(n)
    with qwen.record(layers, "all", sites=("block_input", "attn", "mlp", "block")) as rec:
        logits = qwen.forward(text)
    keep = slice(1, None)  # positions >= 1
    final = torch.log_softmax(logits[0, keep], -1)
    for layer in layers:
        h, a, m, out = (rec[layer, s][0, keep] for s in ("block_input", "attn", "mlp", "block"))
        assert result.attn_rel[layer] == pytest.approx(float((a.norm(dim=-1) / h.norm(dim=-1)).mean()), rel=1e-4)
        assert result.mlp_rel[layer] == pytest.approx(float((m.norm(dim=-1) / (h + a).norm(dim=-1)).mean()), rel=1e-4)
        assert result.block_rel[layer] == pytest.approx(
            float(((out - h).norm(dim=-1) / h.norm(dim=-1)).mean()), rel=1e-4
        )
        cos = torch.nn.functional.cosine_similarity(out - h, h, dim=-1).mean()
        assert result.block_cos[layer] == pytest.approx(float(cos), abs=1e-5)
        lens = torch.log_softmax(logit_lens(qwen, out), -1)
        kl = (lens.exp() * (lens - final)).sum(-1).mean()
        assert result.lens_kl[layer] == pytest.approx(float(kl), rel=1e-3, abs=1e-5)
        overlap = [
            len(set(x.topk(5).indices.tolist()) & set(y.topk(5).indices.tolist())) / 5
            for x, y in zip(lens, final, strict=True)
        ]
        assert result.lens_top5[layer] == pytest.approx(sum(overlap) / len(overlap))
    assert result.lens_kl[-1] == pytest.approx(0.0, abs=1e-5) and result.lens_top5[-1] == 1.0

    # skip matrix: zero before the skipped layer, one at it; entry (0, 2) and the output change by hand
    effect = torch.tensor(result.skip_effect)
    assert torch.equal(effect.tril(-1), torch.zeros(n, n))
    torch.testing.assert_close(effect.diagonal(), torch.ones(n, dtype=effect.dtype))
    with qwen.skip([0]), qwen.record([2], "all", sites=("block_input", "block")) as skipped:
        skipped_logits = qwen.forward(text)
    base = (rec[2] - rec[2, "block_input"])[0, keep]
    changed = (skipped[2] - skipped[2, "block_input"])[0, keep]
    expected = ((changed - base).norm(dim=-1) / base.norm(dim=-1)).max()
    assert result.skip_effect[0][2] == pytest.approx(float(expected), rel=1e-4)
    p, q = final.exp(), torch.softmax(skipped_logits[0, keep], -1)
    assert result.skip_output_l2[0] == pytest.approx(float((q - p).norm(dim=-1).max()), rel=1e-3)
    assert result.skip_output_kl[0] == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-3)
    data = result.to_dict()
    assert data["future_effect"][0] == pytest.approx(sum(result.skip_effect[0][1:]) / (n - 1))
    assert set(data["summary"]) >= {"block_rel_first_half", "future_effect_second_half", "lens_kl_steepest_drop_layer"}


def test_depth_batches_like_one_by_one_and_handles_every_family(lm, tmp_path):
    together = analyze_depth(lm, TEXTS, skip_texts=2)
    alone = [analyze_depth(lm, [t], skip=False) for t in TEXTS]
    counts = [r.num_tokens for r in alone]
    for layer in range(lm.num_layers):
        mean = sum(r.block_rel[layer] * c for r, c in zip(alone, counts, strict=True)) / sum(counts)
        assert together.block_rel[layer] == pytest.approx(mean, rel=1e-4)
        mean_kl = sum(r.lens_kl[layer] * c for r, c in zip(alone, counts, strict=True)) / sum(counts)
        assert together.lens_kl[layer] == pytest.approx(mean_kl, rel=1e-3, abs=1e-5)
    assert together.skip_texts == 2 and together.parallel_residual == lm.arch.parallel_residual
    paths = together.save(tmp_path)
    assert {p.name for p in paths} == {
        "depth.json",
        "depth_contributions.png",
        "depth_logit_lens.png",
        "depth_skip_effect.png",
    }
    assert json.loads((tmp_path / "depth.json").read_text())["num_layers"] == lm.num_layers


def test_depth_takes_a_batch_with_nothing_to_measure(qwen):
    """A one-token text alone in its batch has no token at position >= 1: it adds nothing (it used to crash)."""
    texts = [TEXTS[0], "48"]
    assert [len(r) for r in tokenize(qwen, texts)] == [14, 1]
    alone = analyze_depth(qwen, texts, batch_size=1)
    together = analyze_depth(qwen, texts, batch_size=2)
    assert alone.num_tokens == together.num_tokens == 13 and alone.skip_texts == together.skip_texts == 2
    assert alone.block_rel == pytest.approx(together.block_rel, rel=1e-5)
    assert alone.lens_kl == pytest.approx(together.lens_kl, rel=1e-4, abs=1e-6)
    assert alone.skip_output_kl == pytest.approx(together.skip_output_kl, rel=1e-4, abs=1e-6)
    for a, b in zip(alone.skip_effect, together.skip_effect, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


# ------------------------------------------------------------------------------------------ sparsity


def test_cett_by_hand():
    down = torch.diag(torch.tensor([1.0, 2.0, 3.0]))  # orthogonal neurons with output norms 1, 2, 3
    acts = torch.ones(1, 3)  # neuron output norms n = 1, 2, 3; ||y|| = sqrt(14)
    assert cett(acts, down, 0.0) == 0.0  # nothing (no exact zero) is dropped: no error
    assert cett(acts, down, 1.0) == pytest.approx(1 / math.sqrt(14))
    assert cett(acts, down, 2.5) == pytest.approx(math.sqrt(5 / 14))
    assert cett(acts, down, 3.0) == pytest.approx(1.0)  # everything dropped
    curve = CETTCurve(acts, down)
    assert curve.dropped_fraction(0.0) == 0.0 and curve.dropped_fraction(2.0) == pytest.approx(2 / 3)
    t = curve.threshold_for(0.5)  # CETT is a step function here: 0.267 below n=2, 0.598 from n=2 on
    assert 1.0 <= t <= 2.0 + 1e-6 and curve.cett(t) == pytest.approx(math.sqrt(5 / 14))
    zeros = torch.tensor([[0.0, 1.0, 1.0]])  # an exact zero is "dropped" at t = 0 and costs nothing
    assert cett(zeros, down, 0.0) == 0.0 and CETTCurve(zeros, down).dropped_fraction(0.0) == pytest.approx(1 / 3)


def test_cett_grows_with_the_threshold_on_model_activations(qwen):
    with qwen.record([1], "all", sites=("mlp_act",)) as rec:
        qwen.forward([TEXTS[0]])
    curve = CETTCurve(rec[1, "mlp_act"][0], down_matrix(qwen, 1))
    points = curve.curve()
    kept = [1 - p[1] for p in points]
    values = [p[2] for p in points]
    assert values[0] == 0.0 and kept[0] == 1.0  # threshold 0: SiLU has no exact zeros, nothing dropped
    assert values[-1] == pytest.approx(1.0) and kept[-1] == 0.0
    assert all(b <= a for a, b in pairwise(kept))
    assert all(b >= a - 0.02 for a, b in pairwise(values))  # increasing up to cancellation noise
    for target in (0.1, 0.3, 0.6):
        assert curve.cett(curve.threshold_for(target, tol=1e-3)) == pytest.approx(target, abs=1e-3)


def test_bisection_stops_within_tolerance():
    calls = []

    def f(x):
        calls.append(x)
        return x * x

    found = bisect_increasing(f, 0.25, 0.0, 1.0, tol=1e-3, max_steps=30)
    assert found.converged and abs(found.value - 0.25) <= 1e-3 and len(calls) == len(found.trace) < 30
    capped = bisect_increasing(lambda x: x, 0.3, 0.0, 1.0, tol=1e-9, max_steps=4)
    assert not capped.converged and len(capped.trace) == 4 and capped.x <= 0.3 and capped.value <= 0.3
    never = bisect_increasing(lambda x: 5.0, 1.0, 0.0, 1.0, tol=0.1, max_steps=3)
    assert not never.converged and never.x == 0.0


def test_sparsity_against_hand_counts(qwen, tmp_path):
    result = analyze_sparsity(qwen, TEXTS, threshold=0.05, temporal_tau=0.2, max_search_steps=4)
    tb = _batch(qwen)
    valid = tb.valid(1)
    with qwen.record(range(qwen.num_layers), "all", sites=("mlp_act", "block")) as rec:
        logits = qwen.forward(tb.batch)
    for layer in range(qwen.num_layers):
        a = rec[layer, "mlp_act"][valid]
        assert result.nonzero_exact[layer] == pytest.approx(float((a != 0).float().mean()))
        assert result.nonzero_above[layer] == pytest.approx(float((a.abs() > 0.05).float().mean()))
        x = rec[layer, "mlp_act"]
        hits = total = 0
        for row in range(x.shape[0]):
            for t in range(1, x.shape[1]):
                if valid[row, t] and valid[row, t - 1]:
                    delta = (x[row, t] - x[row, t - 1]).abs()
                    hits += int((delta <= 0.2 * x[row, t].abs().mean()).sum())
                    total += delta.numel()
        assert result.temporal_mlp[layer] == pytest.approx(hits / total)
    # baseline perplexity by hand from the model's own logits (padding excluded)
    real = tb.batch.attention_mask.bool()
    pairs = real[:, :-1] & real[:, 1:]
    logp = torch.log_softmax(logits[:, :-1][pairs], -1)
    nll = -logp.gather(1, tb.batch.input_ids[:, 1:][pairs].unsqueeze(1)).mean()
    assert result.baseline_ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert next_token_nll(qwen, tb, run_decoder(qwen, tb)).numel() == int(pairs.sum())
    # the PPL-p% search: within tolerance, or honestly not converged after its step budget
    tol = 0.1 * result.ppl_percent
    if result.ppl_converged:
        assert abs(result.ppl_increase_percent - result.ppl_percent) <= tol
    else:
        assert len(result.ppl_search) >= 4 and result.ppl_increase_percent <= result.ppl_percent + tol
    chosen = next(s for s in result.ppl_search if s["cett"] == result.ppl_cett)
    assert chosen["increase_percent"] == pytest.approx(result.ppl_increase_percent)
    assert chosen["sparsity"] == pytest.approx(result.ppl_sparsity)
    assert 0.0 <= result.ppl_sparsity <= 1.0
    for key in ("0.1", "0.2", "0.3"):
        assert len(result.cett_thresholds[key]) == qwen.num_layers
    assert result.cett_sparsity["0.1"][0] <= result.cett_sparsity["0.3"][0]
    assert {p.name for p in result.save(tmp_path)} == {
        "sparsity.json",
        "sparsity_nonzero.png",
        "sparsity_cett.png",
        "sparsity_temporal.png",
    }


def test_dropping_neurons_in_the_forward_pass_matches_the_threshold(qwen):
    """The PPL search's edit drops exactly the neurons with |a_i| * ||W_down[:, i]|| <= t."""
    result = analyze_sparsity(qwen, [TEXTS[0]], max_search_steps=2, cett_targets=())
    tb = _batch(qwen, [TEXTS[0]])
    with qwen.record(range(qwen.num_layers), "all", sites=("mlp_act",)) as rec:
        qwen.forward(tb.batch)
    # layer 0's activations are not affected by any edit upstream; its dropped fraction is checkable
    norms = rec[0, "mlp_act"][0, 1:].abs() * down_matrix(qwen, 0).norm(dim=0)
    expected = float((norms <= result.ppl_thresholds[0]).float().mean())
    assert result.ppl_layer_sparsity[0] == pytest.approx(expected)


def test_relu_model_counts_exact_zeros():
    relu = _relu_llama()
    result = analyze_sparsity(relu, TEXTS, max_search_steps=2, cett_targets=(0.2,))
    assert result.relu_like and result.activation == "relu"
    tb = _batch(relu)
    with relu.record(range(relu.num_layers), "all", sites=("mlp_act",)) as rec:
        relu.forward(tb.batch)
    for layer in range(relu.num_layers):
        a = rec[layer, "mlp_act"][tb.valid(1)]
        fraction = float((a != 0).float().mean())
        assert 0.2 < fraction < 0.8  # gated ReLU: about half the gates are closed
        assert result.nonzero_exact[layer] == pytest.approx(fraction)
        curve = CETTCurve(a, down_matrix(relu, layer))
        assert curve.cett(0.0) == 0.0 and curve.dropped_fraction(0.0) == pytest.approx(1 - fraction)


# ------------------------------------------------------------------------------------------ dims


def test_mass_fraction_and_jaccard_by_hand():
    h = torch.tensor([[4.0, -3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(mass_fraction(h, 0.5), torch.tensor([0.5, 0.0, 0.5]))  # 4+3 >= 5; 1+1 >= 2
    torch.testing.assert_close(mass_fraction(h, 0.9), torch.tensor([0.75, 0.0, 1.0]))  # 4+3+2 >= 9; all four
    x, y = torch.tensor([5.0, -4.0, 0.0, 0.1]), torch.tensor([0.0, 4.0, -5.0, 0.1])
    assert float(top_k_jaccard(x, y, 2)) == pytest.approx(1 / 3)  # {0, 1} vs {1, 2}
    assert float(top_k_jaccard(x, x, 2)) == 1.0
    gauss = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert float(mass_fraction(gauss, 0.5)) == pytest.approx(gaussian_fraction(0.5), abs=3e-3)
    assert float(mass_fraction(gauss, 0.9)) == pytest.approx(gaussian_fraction(0.9), abs=3e-3)


def test_dims_against_a_hand_computation(lm, tmp_path):
    result = analyze_dims(lm, TEXTS, top_k_fraction=0.25)
    tb = _batch(lm)
    valid = tb.valid(1)
    k = math.ceil(0.25 * lm.hidden_size)
    with lm.record([1], "all") as rec:
        lm.forward(tb.batch)
    h = rec[1]
    frac50 = []
    jacc = []
    for row in range(h.shape[0]):
        for t in range(h.shape[1]):
            if not valid[row, t]:
                continue
            mags = sorted(h[row, t].abs().tolist(), reverse=True)
            total, running, needed = sum(mags), 0.0, 0
            while running < 0.5 * total * (1 - 1e-6):
                running += mags[needed]
                needed += 1
            frac50.append(needed / lm.hidden_size)
            if t > 0 and valid[row, t - 1]:
                a = set(h[row, t].abs().topk(k).indices.tolist())
                b = set(h[row, t - 1].abs().topk(k).indices.tolist())
                jacc.append(len(a & b) / len(a | b))
    assert result.frac50[1] == pytest.approx(sum(frac50) / len(frac50))
    assert result.jaccard[1] == pytest.approx(sum(jacc) / len(jacc))
    assert result.top_k == k and result.random_jaccard == pytest.approx(k / (2 * lm.hidden_size - k))
    assert all(a <= b for a, b in zip(result.frac50, result.frac90, strict=True))
    assert {p.name for p in result.save(tmp_path)} == {"dims.json", "dims_concentration.png"}


# ------------------------------------------------------------------------------------------ texts


def test_read_texts(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("first text\n\n  \nsecond text\nthird\n")
    assert read_texts(plain) == ["first text", "second text", "third"]
    assert read_texts(plain, limit=2) == ["first text", "second text"]
    gsm = tmp_path / "test.jsonl"
    gsm.write_text('{"question": "Q1?", "answer": "#### 1"}\n\n{"question": "Q2?", "answer": "#### 2"}\n')
    assert read_texts(gsm) == ["Q1?", "Q2?"]
    assert read_texts(gsm, field="answer") == ["#### 1", "#### 2"]
    with pytest.raises(ResidlabError, match="no text file"):
        read_texts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\nnot json\n')
    with pytest.raises(ResidlabError, match=r"bad.jsonl:2: not valid JSON"):
        read_texts(bad)
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 1}\n')
    with pytest.raises(ResidlabError, match="none of the fields"):
        read_texts(other)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ResidlabError, match="holds no text"):
        read_texts(empty)


def test_too_short_texts_are_a_clear_error(qwen):
    with pytest.raises(ResidlabError, match="no token at position"):
        analyze_dims(qwen, ["a"], max_tokens=None, first_position=5)
    with pytest.raises(ResidlabError, match="max_tokens must be at least 2"):
        analyze_depth(qwen, TEXTS, max_tokens=1)
