"""Factual-recall analysis: DLA adds up to the logit on every family and matches hand computations;
frozen norms, position means, head knockouts, attention capture and final-layer ablation by hand."""

from __future__ import annotations

import functools
import os
from contextlib import ExitStack

import pytest
import torch

from residlab.analyses.recall import analyze_recall, freeze_norm
from residlab.analyses.recall.ablation import PositionMeans, ablate_branch, knock_out_heads, means_recording
from residlab.analyses.recall.attention import LastRowAttention
from residlab.analyses.recall.dla import ANSWER, WRONG, dla_recording, last_logits, measure_dla, output_weight
from residlab.analyses.recall.encoding import answer_token, encode_prompts, recall_batches
from residlab.core.errors import ResidlabError
from residlab.data.recall_prompts import RecallPrompt
from residlab.testing import tiny_model

# Words the tiny tokenizer knows (it is trained on a few sentences), so answers differ in their first token.
PROMPTS = [
    RecallPrompt("Natalia sold clips to 48 of her", "friends", "Natalia"),
    RecallPrompt("Weng earns $12 an hour for", "babysitting", "Weng"),
    RecallPrompt("How many clips did Natalia", "sell", "clips"),
    RecallPrompt("The answer is", "72", None),
    RecallPrompt("Let's think step by step about the", "problem", "step by step"),
]


@functools.cache
def _tiny(family: str):
    return tiny_model(family)


def _clean(lm, batch_size=3):
    encoded = encode_prompts(lm, PROMPTS)
    out = []
    for rb in recall_batches(lm, encoded, batch_size):
        with dla_recording(lm) as rec:
            logits = last_logits(lm, rb)
        out.append((rb, measure_dla(lm, rb, rec, logits), logits))
    return out


def test_dla_parts_add_up_to_the_logit_on_every_family(lm):
    for rb, dla, logits in _clean(lm):
        total = dla.total()
        assert torch.allclose(total[:, ANSWER], logits.gather(1, rb.answer_ids[:, None]).squeeze(1), atol=1e-4)
        assert torch.allclose(total[:, WRONG], logits.gather(1, rb.wrong_ids[:, None]).squeeze(1), atol=1e-4)
        assert torch.allclose(dla.logit[:, 0], total[:, ANSWER], atol=1e-4)
        # the vocabulary-mean direction: the mean of all logits
        assert torch.allclose(total[:, 2], logits.mean(dim=-1), atol=1e-4)


def _manual_pass(lm, rb):
    """Inputs of attention's output projection, the branch outputs and the final norm's input, by plain hooks."""
    got: dict = {}
    handles = []
    for layer in range(lm.num_layers):
        attn_out = lm.block_part(layer, "attn_out")
        handles.append(
            attn_out.register_forward_pre_hook(lambda m, a, layer=layer: got.__setitem__(("z", layer), a[0]))
        )
    final = lm.model_part("final_norm")
    handles.append(final.register_forward_pre_hook(lambda m, a: got.__setitem__("r", a[0])))
    try:
        logits = last_logits(lm, rb)
    finally:
        for h in handles:
            h.remove()
    return got, logits


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "qwen2"])
def test_head_dla_matches_a_hand_computation(family):
    """Head h's DLA = (post-norm of) W_O[:, h] z_h through the frozen final norm onto W_U[answer]."""
    lm = _tiny(family)
    rb = next(recall_batches(lm, encode_prompts(lm, PROMPTS), 4))
    with dla_recording(lm) as rec:
        logits = last_logits(lm, rb)
    dla = measure_dla(lm, rb, rec, logits)
    got, _ = _manual_pass(lm, rb)
    r = got["r"][:, -1].float()
    norm = lm.model_part("final_norm")
    if isinstance(norm, torch.nn.LayerNorm):
        scale = 1 / torch.sqrt(r.var(dim=-1, unbiased=False) + norm.eps)
        gain = norm.weight
    else:
        scale = 1 / torch.sqrt(r.pow(2).mean(dim=-1) + getattr(norm, "variance_epsilon", getattr(norm, "eps", 0)))
        gain = (1 + norm.weight) if family == "gemma3" else norm.weight
    unembed = lm.model_part("unembed").weight[rb.answer_ids]  # [n, d]
    heads = lm.model.config.num_attention_heads
    for layer in (0, lm.num_layers - 1):
        for head in (0, heads - 1):
            z = got[("z", layer)][:, -1].float()
            dh = z.shape[-1] // heads
            weight, bias = output_weight(lm.block_part(layer, "attn_out"))
            part = z[:, head * dh : (head + 1) * dh] @ weight[:, head * dh : (head + 1) * dh].T  # [n, d]
            if family == "gemma3":  # the post-attention norm, frozen at attention's whole output
                post = lm.block_part(layer, "post_attn_norm")
                whole = z @ weight.T
                post_scale = 1 / torch.sqrt(whole.pow(2).mean(dim=-1) + post.eps)
                part = part * post_scale[:, None] * (1 + post.weight)
            if isinstance(norm, torch.nn.LayerNorm):
                part = part - part.mean(dim=-1, keepdim=True)
            expected = ((part * scale[:, None] * gain) * unembed).sum(dim=-1)
            assert torch.allclose(dla.heads[:, layer, head, ANSWER], expected, atol=1e-5), (layer, head)


def test_frozen_norms_equal_the_modules_and_are_linear():
    x = torch.randn(4, 64)
    parts = torch.randn(4, 3, 64)
    for family in ("gpt2", "qwen2", "gemma3"):
        lm = _tiny(family)
        for module in (lm.model_part("final_norm"), lm.block_part(0, "input_norm")):
            with torch.no_grad():
                module.weight.add_(0.1 * torch.randn_like(module.weight))  # non-trivial gains
            try:
                frozen = freeze_norm(module, x)
                assert torch.allclose(frozen(x), module(x), atol=1e-5)
                # linear in the parts at the frozen scale: the parts' shares add up to the whole
                summed = frozen.linear(parts).sum(dim=1)
                assert torch.allclose(summed, frozen.linear(parts.sum(dim=1)), atol=1e-5)
                direction = torch.randn(4, 64)
                v = frozen.readout(direction)
                assert torch.allclose(
                    (v * parts[:, 0]).sum(-1), (direction * frozen.linear(parts[:, 0])).sum(-1), atol=1e-4
                )
            finally:
                _tiny.cache_clear()


def test_a_norm_of_another_kind_is_refused():
    class Doubler(torch.nn.Module):
        eps = 1e-6

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return 2 * x * self.weight

    with pytest.raises(ResidlabError, match="does not behave as a LayerNorm or RMSNorm"):
        freeze_norm(Doubler(), torch.randn(3, 8))


def test_position_means_align_from_the_last_token():
    means = PositionMeans()
    values = torch.tensor([[[9.0], [1.0], [2.0]], [[3.0], [4.0], [5.0]]])  # row 0 is left-padded by one
    real = torch.tensor([[False, True, True], [True, True, True]])
    means.add((0, "x"), values, real)
    means.add((0, "x"), torch.tensor([[[10.0], [20.0]]]), torch.tensor([[True, True]]))
    # distance 0 (last token): 2, 5, 20; distance 1: 1, 4, 10; distance 2: 3 only
    assert means.mean((0, "x")).squeeze(1).tolist() == pytest.approx([9.0, 5.0, 3.0])
    assert means.at((0, "x"), 2).squeeze(1).tolist() == pytest.approx([5.0, 9.0])


def test_head_knockout_replaces_exactly_the_heads_slice_with_its_position_mean():
    lm = _tiny("qwen2")
    encoded = encode_prompts(lm, PROMPTS)
    batches = list(recall_batches(lm, encoded, 2))
    means = PositionMeans()
    manual: list = []
    for rb in batches:
        with means_recording(lm) as rec:
            last_logits(lm, rb)
        means.add_recording(rec, rb.batch.attention_mask.bool())
        manual.append((rec.calls(1, "attn_heads")[-1], rb.batch.attention_mask.bool()))
    # the mean of layer 1's heads at the last token, by hand
    last_mean = torch.stack([z[row, -1] for z, _ in manual for row in range(z.shape[0])]).mean(dim=0)
    heads, dh = lm.model.config.num_attention_heads, 64 // lm.model.config.num_attention_heads
    rb = batches[0]
    with ExitStack() as stack:
        knock_out_heads(lm, [(1, 2)], means, stack)
        rec = stack.enter_context(lm.record([1], "last", ("attn_heads",)))
        last_logits(lm, rb)
    with lm.record([1], "last", ("attn_heads",)) as clean:
        last_logits(lm, rb)
    z, z_clean = rec[1, "attn_heads"], clean[1, "attn_heads"]
    ablated = slice(2 * dh, 3 * dh)
    assert torch.allclose(z[:, ablated], last_mean[ablated].expand(z.shape[0], -1), atol=1e-5)
    kept = torch.ones(heads * dh, dtype=torch.bool)
    kept[ablated] = False
    # heads of layer 1 other than 2 read layers below the edit only: unchanged
    assert torch.allclose(z[:, kept], z_clean[:, kept], atol=1e-5)


def test_zeroing_the_last_layer_leaves_the_unembedded_block_input():
    lm = _tiny("llama")
    rb = next(recall_batches(lm, encode_prompts(lm, PROMPTS), 5))
    last = lm.num_layers - 1
    with lm.record([last], "last", ("block_input",)) as rec:
        last_logits(lm, rb)
    expected = lm.model_part("unembed")(lm.model_part("final_norm")(rec[last, "block_input"]))
    with ExitStack() as stack:
        for branch in ("attn", "mlp"):
            ablate_branch(lm, last, branch, "zero", PositionMeans(), stack)
        logits = last_logits(lm, rb)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_last_row_attention_matches_output_attentions_and_restores_the_implementation():
    lm = _tiny("qwen2")
    before = lm.model.config._attn_implementation
    rb = next(recall_batches(lm, encode_prompts(lm, PROMPTS), 5))
    with LastRowAttention(lm) as att:
        last_logits(lm, rb)
        during = lm.model.config._attn_implementation
    assert during == "eager" and lm.model.config._attn_implementation == before
    real = rb.batch.attention_mask.bool()
    for layer in range(lm.num_layers):
        row = att.rows[layer]  # [n, heads, keys]
        assert torch.allclose(row.sum(dim=-1), torch.ones(row.shape[:2]), atol=1e-5)
        assert float(row.masked_select(~real[:, None, :].expand_as(row)).abs().max()) < 1e-6  # padding unseen
    lm.model.set_attn_implementation("eager")
    try:
        out = lm.model(input_ids=rb.batch.input_ids, attention_mask=rb.batch.attention_mask, output_attentions=True)
    finally:
        lm.model.set_attn_implementation(before)
    assert torch.allclose(att.rows[1], out.attentions[1][:, :, -1].float(), atol=1e-5)


def test_encoding_finds_the_subject_tokens_and_a_wrong_answer():
    lm = _tiny("qwen2")
    encoded = encode_prompts(lm, PROMPTS)
    for prompt, enc in zip(PROMPTS, encoded, strict=True):
        assert enc.answer_id == lm.tokenizer(" " + prompt.answer, add_special_tokens=False)["input_ids"][0]
        assert enc.wrong_id != enc.answer_id
        if prompt.subject is None:
            assert enc.subject_positions == ()
            continue
        spelled = lm.tokenizer.decode([enc.ids[i] for i in enc.subject_positions])
        assert prompt.subject in spelled and len(spelled.strip()) <= len(prompt.subject) + 2
    assert answer_token(lm, "The answer is ", "72") == lm.tokenizer("72", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ResidlabError, match="same token"):
        encode_prompts(lm, [RecallPrompt("How many", "clips"), RecallPrompt("The answer is", "clips")])


def test_analyze_recall_knockout_decomposition_and_result_files(tmp_path):
    lm = _tiny("gpt2")
    result = analyze_recall(lm, PROMPTS, knockout_ks=(1, 2), random_draws=2, batch_size=2)
    assert result.dla_sum_max_error < 1e-4
    assert len(result.candidates) == 2 and len(result.knockouts) == 2
    for ko in result.knockouts:
        # the DLA parts under the knockout add up to its logits too, so the drop splits exactly
        parts = ko.direct_drop + ko.via_mlps + ko.via_other_attention + ko.via_embedding
        assert parts == pytest.approx(ko.drop_logit_diff, abs=1e-4)
    assert result.knockouts[-1].random_draws == 2 and result.knockouts[0].random_draws == 0
    assert [a.target for a in result.final_layer.ablations] == ["attn", "attn", "mlp", "mlp", "attn+mlp", "attn+mlp"]
    assert [f.name for f in result.findings] == ["mover_heads", "mlp_amplification", "final_layer_suppression"]
    top = result.candidates[0]
    assert result.head_dla_diff[top.layer][top.head] == pytest.approx(top.dla_diff)
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"recall.json", "recall_dla.png", "recall_movers.png", "recall_ablations.png"}
    with pytest.raises(ResidlabError, match="knockout sizes"):
        analyze_recall(lm, PROMPTS, knockout_ks=(0,))


@pytest.fixture
def real_cache(monkeypatch):
    """The user's cache (as tests/test_real_model.py): the model is fetched and converted once per machine."""
    monkeypatch.delenv("RESIDLAB_CACHE", raising=False)
    if os.environ.get("RESIDLAB_REAL_CACHE"):
        monkeypatch.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])


@pytest.mark.real_model
def test_recall_on_the_default_model(real_cache):
    from residlab.data.recall_prompts import capital_prompts
    from residlab.models.loading import load

    lm = load("qwen2.5-coder-0.5b-instruct")
    result = analyze_recall(lm, capital_prompts(limit=12), knockout_ks=(1, 3), random_draws=1, batch_size=12)
    assert result.dla_sum_max_error < 1e-3  # the parts add up to the model's own logit
    assert result.clean.accuracy >= 0.5
    top = result.candidates[0]
    assert top.subject_attention > 0.5 and top.dla_diff > 0  # a head reads the country and writes the capital
    assert result.knockouts[-1].drop_logit_diff > 0


def test_dla_in_bfloat16_still_adds_up_within_its_precision():
    lm = tiny_model("qwen2")
    lm.model.to(torch.bfloat16)
    for rb, dla, logits in _clean(lm):
        total = dla.total()[:, ANSWER]
        actual = logits.gather(1, rb.answer_ids[:, None]).squeeze(1)
        assert torch.allclose(total, actual, atol=0.1 * max(1.0, float(actual.abs().max())))
