import pytest
import torch
from conftest import PROMPTS, hook_keys, random_vector

from residlab import ModelMismatchError, ResidlabError
from residlab.models.architectures import get_module


def test_strength_zero_is_bit_identical_to_no_hook(lm):
    vec = random_vector(lm, [1])
    plain = lm.forward(PROMPTS)
    with lm.steer(vec, strength=0.0, positions="all"):
        steered = lm.forward(PROMPTS)
    assert torch.equal(plain, steered)


def test_steering_changes_the_output(lm):
    vec = random_vector(lm, [1])
    plain = lm.forward(PROMPTS)
    with lm.steer(vec, strength=1.0, positions="all"):
        steered = lm.forward(PROMPTS)
    assert not torch.allclose(plain, steered)


def test_steered_forward_equals_manual_addition(lm):
    """Independent of residlab's hooks: add the vector to block 1's output with a bare torch hook."""
    vec = random_vector(lm, [1])
    strength = 0.7
    block = lm.blocks[1]

    def by_hand(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + strength * vec.directions[1], *output[1:])
        return output + strength * vec.directions[1]

    handle = block.register_forward_hook(by_hand)
    try:
        expected = lm.forward(["Natalia sold clips to 48 of her friends."])
    finally:
        handle.remove()
    with lm.steer(vec, strength=strength, positions="all"):
        got = lm.forward(["Natalia sold clips to 48 of her friends."])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_manual_run_of_the_remaining_blocks_llama():
    """Fully manual: take block 0's output, add the vector, run blocks 1.. and the head by hand."""
    from residlab.testing import tiny_model

    lm = tiny_model("llama")
    vec = random_vector(lm, [0])
    ids = lm.encode(["Natalia sold clips to 48 of her friends."]).input_ids
    model = lm.model
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[1] + 0.5 * vec.directions[0]
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = model.model.rotary_emb(h, positions)
        for block in lm.blocks[1:]:
            h = block(h, attention_mask=None, position_embeddings=rotary, position_ids=positions)
            h = h[0] if isinstance(h, tuple) else h
        expected = model.lm_head(model.model.norm(h))
    with lm.steer(vec, strength=0.5, positions="all"):
        got = lm.forward(["Natalia sold clips to 48 of her friends."])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["all", "prompt", "generated", "prompt_last+generated", (0, -1)])
def test_kv_cache_does_not_change_steered_generation(lm, rule):
    vec = random_vector(lm, [1, 2], scale=2.0)
    with lm.steer(vec, strength=1.0, positions=rule):
        cached = lm.generate(PROMPTS, max_new_tokens=8, chat=False, use_cache=True)
        uncached = lm.generate(PROMPTS, max_new_tokens=8, chat=False, use_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]


def test_each_rule_has_a_distinct_effect(qwen):
    vec = random_vector(qwen, [1], scale=4.0)
    outputs = {}
    for rule in ["all", "prompt", "generated", "prompt_last+generated"]:
        with qwen.steer(vec, strength=1.0, positions=rule):
            outputs[rule] = tuple(g.token_ids for g in qwen.generate(PROMPTS, max_new_tokens=6, chat=False))
    assert len(set(outputs.values())) == 4


def test_generated_rule_leaves_the_prompt_untouched(qwen):
    vec = random_vector(qwen, [1], scale=4.0)
    plain = qwen.forward(PROMPTS)
    with qwen.steer(vec, strength=1.0, positions="generated"):
        assert torch.equal(qwen.forward(PROMPTS), plain)  # a plain forward is all prompt
    with qwen.steer(vec, strength=1.0, positions="prompt_last+generated"):
        steered = qwen.forward(PROMPTS)
    # only the last real token changes (left padding: the last column)
    assert torch.equal(steered[:, :-1], plain[:, :-1])
    assert not torch.allclose(steered[:, -1], plain[:, -1])


def test_left_padded_batch_equals_one_by_one(lm):
    vec = random_vector(lm, [1], scale=2.0)
    with lm.record(layers=[0, 2], positions="last") as rec:
        lm.forward(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        with lm.record(layers=[0, 2], positions="last") as single:
            lm.forward([prompt])
        for layer in (0, 2):
            torch.testing.assert_close(rec[layer][i], single[layer][0], rtol=1e-4, atol=1e-4)
    for rule in ["all", "prompt_last+generated", "generated"]:
        with lm.steer(vec, strength=1.0, positions=rule):
            batched = lm.generate(PROMPTS, max_new_tokens=8, chat=False, batch_size=3)
            alone = [lm.generate([p], max_new_tokens=8, chat=False)[0] for p in PROMPTS]
        assert [g.token_ids for g in batched] == [g.token_ids for g in alone], rule


def test_per_row_strengths_and_vectors(qwen):
    v1, v2 = random_vector(qwen, [1], seed=1), random_vector(qwen, [1], seed=2)
    with qwen.steer([v1, v2, v1], strength=[0.0, 1.0, 0.5], positions="all"):
        mixed = qwen.generate(PROMPTS, max_new_tokens=6, chat=False, batch_size=2)  # sorted and split
    expected = []
    for prompt, vec, s in zip(PROMPTS, [v1, v2, v1], [0.0, 1.0, 0.5], strict=True):
        with qwen.steer(vec, strength=s, positions="all"):
            expected.append(qwen.generate([prompt], max_new_tokens=6, chat=False)[0].token_ids)
    assert [g.token_ids for g in mixed] == expected
    assert expected[0] == qwen.generate([PROMPTS[0]], max_new_tokens=6, chat=False)[0].token_ids


def test_hf_generate_inside_the_context_is_steered_like_ours(qwen):
    """The position tracker also follows transformers' own generate loop (KV cache on)."""
    vec = random_vector(qwen, [1], scale=3.0)
    batch = qwen.encode(PROMPTS)
    with qwen.steer(vec, strength=1.0, positions="prompt_last+generated"):
        ours = qwen.generate(PROMPTS, max_new_tokens=6, chat=False, batch_size=3)
        hf = qwen.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=qwen.pad_token_id,
            eos_token_id=qwen.eos_token_ids,
        )
    width = batch.input_ids.shape[1]
    for g, row in zip(ours, hf[:, width:].tolist(), strict=True):
        assert list(g.token_ids) == row[: len(g.token_ids)]


def test_hooks_are_removed_on_exit_and_on_exceptions(lm):
    vec = random_vector(lm, [0, 2])
    before = hook_keys(lm)
    with lm.steer(vec, strength=1.0), lm.record(layers=[1], sites=("block", "attn", "mlp", "mlp_act")):
        lm.forward(PROMPTS)
        assert len(hook_keys(lm) - before) == 2 + 1 + 1 + 4  # 2 steered blocks, tracker, recorder, 4 sites
    assert hook_keys(lm) == before
    with pytest.raises(RuntimeError, match="boom"):
        with lm.steer(vec, strength=1.0), lm.record(layers=[1]):
            raise RuntimeError("boom")
    assert hook_keys(lm) == before
    assert lm.tracker._users == 0


def test_model_is_not_mutated(qwen):
    before = {k: v.clone() for k, v in qwen.model.state_dict().items()}
    modules_before = [type(m) for m in qwen.model.modules()]
    tokenizer_before = (qwen.tokenizer.padding_side, qwen.tokenizer.truncation_side, qwen.tokenizer.pad_token)
    with qwen.steer(random_vector(qwen, [1]), strength=5.0):
        qwen.generate(PROMPTS, max_new_tokens=3, chat=False)
    assert all(torch.equal(before[k], v) for k, v in qwen.model.state_dict().items())
    assert modules_before == [type(m) for m in qwen.model.modules()]
    # left-padded batches are built by hand: the tokenizer's settings are never changed
    assert (qwen.tokenizer.padding_side, qwen.tokenizer.truncation_side, qwen.tokenizer.pad_token) == tokenizer_before


def test_errors_for_bad_steering_requests(qwen, lm):
    vec = random_vector(qwen, [1])
    with pytest.raises(ResidlabError, match="position rule"):
        qwen.steer(vec, positions="sometimes")
    with pytest.raises(ResidlabError, match="layer 7 does not exist"):
        qwen.steer(vec, layers=[7])
    with pytest.raises(ResidlabError, match="no direction for layer"):
        qwen.steer(vec, layers=[2])
    if lm is not qwen:
        with pytest.raises(ModelMismatchError):
            lm.steer(vec)


def test_record_sites_and_positions(qwen):
    arch = qwen.arch
    with qwen.record(layers=[1], positions="all", sites=("block_input", "attn", "mlp", "block", "mlp_act")) as rec:
        qwen.forward(["Natalia sold clips"])
    # pre-norm residual identity: block output = input + attention + MLP
    torch.testing.assert_close(rec[1, "block"], rec[1, "block_input"] + rec[1, "attn"] + rec[1, "mlp"])
    down = get_module(qwen.blocks[1], arch.mlp_down)
    with torch.inference_mode():
        torch.testing.assert_close(down(rec[1, "mlp_act"]), rec[1, "mlp"])
    with qwen.record(layers=[1], positions=[0, -1]) as idx, qwen.record(layers=[1], positions="all") as full:
        qwen.forward(PROMPTS)
    lengths = qwen.encode(PROMPTS).lengths
    width = full[1].shape[1]
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(idx[1][row, 0], full[1][row, width - n])
        torch.testing.assert_close(idx[1][row, 1], full[1][row, -1])
    with pytest.raises(ResidlabError, match="does not exist"):
        with qwen.record(layers=[1], positions=[40]):
            qwen.forward(PROMPTS)


def test_rows_that_finish_early_leave_the_batch_correctly(lm, monkeypatch):
    """Make one row's 3rd token the end-of-sequence token: that row stops early and is pruned from the
    batch and the KV cache, while the others go on exactly as they would alone (per-row steering too)."""
    free = lm.generate(PROMPTS, max_new_tokens=8, chat=False, ignore_eos=True)
    stop = free[0].token_ids[2]
    monkeypatch.setattr(type(lm), "eos_token_ids", property(lambda self: [stop]))
    v1, v2 = random_vector(lm, [1], seed=1), random_vector(lm, [1], seed=2)
    with lm.steer([v1, v2, v1], strength=[0.0, 1.0, 0.5], positions="all"):
        batched = lm.generate(PROMPTS, max_new_tokens=8, chat=False, batch_size=3)
    alone = []
    for prompt, vec, s in zip(PROMPTS, [v1, v2, v1], [0.0, 1.0, 0.5], strict=True):
        with lm.steer(vec, strength=s, positions="all"):
            alone.append(lm.generate([prompt], max_new_tokens=8, chat=False)[0])
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert batched[0].num_tokens <= 3 and not batched[0].hit_limit
    assert any(g.num_tokens > 3 for g in batched)  # someone went on after row 0 left


def _contexts() -> list:
    """Synthetic forward passes: a left-padded prompt pass (prompts of 1, 2 and 5 tokens), a pass that
    re-feeds prompt and generated tokens without a cache, and one cached step of generated tokens."""
    from residlab.interventions.positions import ForwardContext

    lengths = torch.tensor([1, 2, 5])
    prompt_pass = torch.tensor([[-1, -1, -1, -1, 0], [-1, -1, -1, 0, 1], [0, 1, 2, 3, 4]])
    uncached = torch.tensor([[-1, -1, -1, -1, 0, 1, 2, 3], [-1, -1, -1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    cached_step = torch.tensor([[4], [5], [8]])
    return [ForwardContext(p, lengths, torch.arange(3)) for p in (prompt_pass, uncached, cached_step)]


def _steered_by_phases(phases, position: int, prompt_length: int) -> bool:
    if position < 0:  # padding
        return False
    if position < prompt_length - 1:
        return phases.prompt_body
    return phases.prompt_last if position == prompt_length - 1 else phases.generated


def test_phase_table_agrees_with_the_position_rules():
    """The phases llama.cpp switches its control vector between (prompt minus its last token, last
    prompt token, generated tokens) select exactly the positions ``steering_mask`` steers."""
    from residlab.interventions.positions import PHASED_RULES, STEERING_RULES, steering_mask, steering_phases

    assert set(PHASED_RULES) == set(STEERING_RULES)  # every named rule runs on every engine
    assert steering_phases((0, -1)) is None and steering_phases("sometimes") is None
    for rule, phases in PHASED_RULES.items():
        assert steering_phases(rule) == phases
        for ctx in _contexts():
            rows = zip(ctx.positions.tolist(), ctx.prompt_lengths.tolist(), strict=True)
            expected = torch.tensor([[_steered_by_phases(phases, p, n) for p in row] for row, n in rows])
            assert torch.equal(steering_mask(rule, ctx), expected), (rule, ctx.positions)


def test_vector_accepted_for_another_model_name_can_steer(qwen, tmp_path):
    # Regression: load(..., strict=False) accepted the vector, then steering checked the name again and
    # raised a ModelMismatchError whose hint named the flag already given.
    from residlab import LanguageModel, ModelMismatchError, SteeringVector

    renamed = LanguageModel(qwen.model, qwen.tokenizer, name="my-own-wrapper")
    path = random_vector(qwen, [1]).save(tmp_path / "v.safetensors")
    with pytest.raises(ModelMismatchError):
        SteeringVector.load(path, model=renamed)
    vec = SteeringVector.load(path, model=renamed, strict=False)
    with pytest.raises(ModelMismatchError):
        renamed.steer(vec)  # still refused unless asked
    with renamed.steer(vec, strength=2.0, allow_other_model=True):
        steered = renamed.generate(PROMPTS[:1], max_new_tokens=3, chat=False)[0]
    assert steered.token_ids != renamed.generate(PROMPTS[:1], max_new_tokens=3, chat=False)[0].token_ids


def test_the_vectors_recorded_rule_is_the_default(qwen):
    # Regression: lm.steer ignored the rule a vector records (an imported llama.cpp / repeng file: all)
    # and always steered prompt_last+generated.
    from dataclasses import replace

    from residlab.engines import SteeringSpec

    vec = replace(random_vector(qwen, [1], scale=4.0), position_rule="all")
    with qwen.steer(vec) as steering:
        default = qwen.forward(PROMPTS)
    assert steering.rule == "all"
    with qwen.steer(vec, positions="all"):
        assert torch.equal(default, qwen.forward(PROMPTS))
    with qwen.steer(vec, positions="prompt_last+generated") as explicit:
        assert not torch.allclose(default, qwen.forward(PROMPTS))
    assert explicit.rule == "prompt_last+generated"
    assert SteeringSpec(vec).positions == SteeringSpec(vec).rule == "all"
    assert SteeringSpec(vec, positions="generated").rule == "generated"
    indexed = replace(vec, position_rule="0,-1")
    assert qwen.steer(indexed).rule == (0, -1)
    with pytest.raises(ResidlabError, match="different position rules"):
        qwen.steer([vec, replace(vec, position_rule="generated")])
    assert qwen.steer([vec, replace(vec, position_rule="generated")], positions="prompt").rule == "prompt"
