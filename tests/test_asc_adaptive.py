"""Adaptive steering strength: each schedule's scales by hand, and generation under a schedule exact
under the KV cache (against a full recompute and a hand-applied teacher-forced reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import PROMPTS, random_vector

from residlab import ResidlabError
from residlab.engines import SamplingParams, SteeringSpec, open_engine
from residlab.evaluation.runner import Condition, Decoding
from residlab.interventions.schedules import (
    SCHEDULES,
    AfterSetup,
    EntropyScaled,
    ScheduleStep,
    StepBoundaries,
    StrengthSchedule,
    UntilAnswer,
    UntilThoughtEnds,
    answer_written,
    position_scales,
    strength_schedule,
)
from residlab.methods.asc.conditions import compress_conditions


@dataclass(frozen=True)
class OddTokens(StrengthSchedule):
    """A test schedule with per-row, per-step 0/1/2 values that depend on what was generated."""

    name: ClassVar[str] = "odd-tokens"

    def scales(self, step: ScheduleStep) -> torch.Tensor:
        return torch.tensor([float(t % 3) for t in step.tokens.tolist()])


def _step(tok, texts, previous=None, logits=None):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return ScheduleStep(
        tokens=torch.tensor([row[-1] for row in ids]),
        logits=logits if logits is not None else torch.zeros(len(ids), 5),
        previous=previous if previous is not None else torch.ones(len(ids)),
        generated=ids,
        decode=tok.decode,
    )


def test_answer_marker_needs_its_balanced_closing_brace():
    assert answer_written("so \\boxed{72}")
    assert answer_written("x \\boxed{\\frac{1}{2}} done")
    assert not answer_written("x \\boxed{\\frac{1}{2}")
    assert not answer_written("no box {72}")


def test_each_schedule_by_hand(qwen):
    tok = qwen.tokenizer
    step = _step(tok, ["a \\boxed{7}", "a \\boxed{7", "line\n"], previous=torch.tensor([1.0, 1.0, 0.0]))
    assert UntilAnswer().scales(step).tolist() == [0.0, 1.0, 0.0]  # written; not yet; latched off
    assert StepBoundaries().scales(step).tolist() == [0.0, 0.0, 1.0]
    uniform, peaked = torch.zeros(5), torch.tensor([50.0, 0, 0, 0, 0])
    step = _step(tok, ["a", "b"], logits=torch.stack([uniform, peaked]))
    scales = EntropyScaled(reference=1.0, cap=10.0).scales(step)
    assert scales[0].item() == pytest.approx(torch.log(torch.tensor(5.0)).item())
    assert scales[1].item() == pytest.approx(0.0, abs=1e-6)
    assert EntropyScaled(reference=0.1, cap=2.0).scales(step)[0].item() == 2.0
    with pytest.raises(ResidlabError, match="positive reference"):
        EntropyScaled(reference=0.0)
    assert set(SCHEDULES) == {"until-answer", "step-boundaries", "entropy", "after-setup", "until-thought-ends"}
    assert strength_schedule(None) is None and isinstance(strength_schedule("entropy"), EntropyScaled)
    with pytest.raises(ResidlabError, match="unknown adaptive strength"):
        strength_schedule("sometimes")


def test_after_setup_waits_for_the_first_equals_sign_then_stays_on(qwen):
    tok = qwen.tokenizer
    # Rows: a first token with "="; a later "=" while off; a later token with none while off; on already.
    step = _step(tok, [" =", "Let x be 2 =", "Let x be", "so x"], previous=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert AfterSetup().scales(step).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert AfterSetup().scales(_step(tok, ["Let"])).tolist() == [0.0]  # the first token, no "=": off


def test_until_thought_ends_stops_at_the_end_of_thinking_not_at_an_answer_written_while_thinking(qwen):
    tok = qwen.tokenizer
    thinking = "Okay, 3 + 4 = 7, so \\boxed{7}. Wait, let me check"
    rows = [thinking, thinking + ".\n</think>", thinking + ".\n</think", "The answer is 7."]
    step = _step(tok, rows, previous=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # Still thinking (an answer inside the thinking does not count); closed; not yet closed; latched off.
    assert UntilThoughtEnds().scales(step).tolist() == [1.0, 0.0, 1.0, 0.0]
    boxed = _step(tok, ["Okay, 3 + 4 = 7, so \\boxed{7}"])  # an answer written while thinking
    assert UntilAnswer().scales(boxed).tolist() == [0.0] and UntilThoughtEnds().scales(boxed).tolist() == [1.0]
    # The marker may arrive split over tokens: the token that completes it ends the thinking.
    ids = tok("so 7.\n</think>\n\nThe answer", add_special_tokens=False)["input_ids"]
    scale, scales = torch.ones(1), []
    for end in range(1, len(ids) + 1):
        prefix = ids[:end]
        scale = UntilThoughtEnds().scales(
            ScheduleStep(torch.tensor([prefix[-1]]), torch.zeros(1, 5), scale, [prefix], tok.decode)
        )
        scales.append(scale.item())
    closing = next(k for k in range(len(ids)) if "</think>" in tok.decode(ids[: k + 1]))
    assert scales == [1.0] * closing + [0.0] * (len(ids) - closing)


def test_position_scales_map_generated_positions():
    positions = torch.tensor([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
    prompts = torch.tensor([2, 3])
    generated = torch.tensor([[0.5, 0.0], [2.0, 3.0]])
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 2.0, 3.0]])
    assert torch.equal(position_scales(positions, prompts, generated), expected)


SCHEDULE_CASES = [
    OddTokens(),
    EntropyScaled(reference=1.0, cap=10.0),
    StepBoundaries(),
    UntilAnswer(),
    AfterSetup(marker="e"),  # a marker random tokens reach within 8 steps: both phases are exercised
    UntilThoughtEnds(marker="e"),  # the same for the end-of-thinking latch
]


def _cached_recomputed_alone(lm, schedule, rule):
    vec = random_vector(lm, [1], scale=3.0)
    with lm.steer(vec, strength=1.0, positions=rule):
        cached = lm.generate(PROMPTS, max_new_tokens=8, chat=False, schedule=schedule, batch_size=2)
        recomputed = lm.generate(PROMPTS, max_new_tokens=8, chat=False, schedule=schedule, use_cache=False)
        alone = [lm.generate([p], max_new_tokens=8, chat=False, schedule=schedule)[0] for p in PROMPTS]
    assert [g.token_ids for g in cached] == [g.token_ids for g in recomputed] == [g.token_ids for g in alone]


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=lambda s: s.name)
def test_each_schedule_is_exact_under_the_kv_cache(qwen, schedule):
    _cached_recomputed_alone(qwen, schedule, "prompt_last+generated")


def test_schedules_are_exact_under_the_kv_cache_in_every_family(lm):
    _cached_recomputed_alone(lm, OddTokens(), "all")


def test_scheduled_generation_equals_a_hand_applied_teacher_forced_pass(qwen):
    """Replay the schedule on the generated tokens, add scale x delta per position by hand in one
    teacher-forced pass: its greedy argmax at every position is the generated token."""
    vec = random_vector(qwen, [1], scale=3.0)
    delta = vec.directions[1]
    schedule = OddTokens()
    with qwen.steer(vec, strength=1.0, positions="all"):
        out = qwen.generate([PROMPTS[0]], max_new_tokens=10, chat=False, schedule=schedule)[0]
        plain = qwen.generate([PROMPTS[0]], max_new_tokens=10, chat=False)[0]
    assert out.token_ids != plain.token_ids  # the schedule changed something
    prompt = qwen.tokenizer(PROMPTS[0])["input_ids"]
    gen = list(out.token_ids)
    scales = [1.0] * len(prompt) + [float(t % 3) for t in gen]
    weights = torch.tensor(scales[: len(prompt) + len(gen) - 1])

    def add_scaled(value, ctx):
        return value + weights.view(1, -1, 1).to(value.dtype) * delta.to(value.dtype)

    ids = torch.tensor([prompt + gen[:-1]])
    with torch.no_grad(), qwen.edit(1, "block", add_scaled):
        logits = qwen.model(input_ids=ids).logits[0]
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == gen


def test_constant_schedules_reduce_to_plain_steering(qwen):
    vec = random_vector(qwen, [1], scale=3.0)
    with qwen.steer(vec, strength=1.0, positions="all"):
        ones = qwen.generate(PROMPTS, max_new_tokens=8, chat=False, schedule=Constant(1.0))
        steady = qwen.generate(PROMPTS, max_new_tokens=8, chat=False)
        zeros = qwen.generate(PROMPTS, max_new_tokens=8, chat=False, schedule=Constant(0.0))
    with qwen.steer(vec, strength=1.0, positions="prompt"):
        prompt_only = qwen.generate(PROMPTS, max_new_tokens=8, chat=False)
    assert [g.token_ids for g in ones] == [g.token_ids for g in steady]
    assert [g.token_ids for g in zeros] == [g.token_ids for g in prompt_only]


def test_torch_engine_and_conditions_carry_the_schedule(qwen):
    vec = random_vector(qwen, [1], scale=3.0)
    engine = open_engine("unused", "torch", lm=qwen)
    spec = SteeringSpec(vec, 1.0, "all", schedule=OddTokens())
    with qwen.steer(vec, strength=1.0, positions="all"):
        direct = qwen.generate(PROMPTS, max_new_tokens=6, chat=False, schedule=OddTokens())
    via_engine = engine.generate(PROMPTS, SamplingParams(6), steering=spec, chat=False)
    assert [g.token_ids for g in via_engine] == [g.token_ids for g in direct]

    names = ("baseline", "asc", "asc-until-answer", "asc-entropy+chain_of_draft", "chain_of_draft")
    conditions = compress_conditions(names, vec, 2.0, "prompt_last+generated")
    assert [type(c.schedule).__name__ for c in conditions] == [
        "NoneType",
        "NoneType",
        "UntilAnswer",
        "EntropyScaled",
        "NoneType",
    ]
    decoding = Decoding(max_new_tokens=8)
    prints = [c.fingerprint(decoding, "m") for c in conditions]
    assert len(set(prints[1:4])) == 3  # a schedule changes the fingerprint
    # A constant-strength condition's fingerprint is what it always was (no schedule key).
    assert conditions[1].fingerprint(decoding, "m") == Condition(
        "asc", conditions[1].template, vector=vec, strength=2.0, positions="prompt_last+generated"
    ).fingerprint(decoding, "m")
    with pytest.raises(ResidlabError, match="unknown adaptive strength"):
        compress_conditions(["asc-sometimes"], vec, 2.0, "all")


@dataclass(frozen=True)
class Constant(StrengthSchedule):
    name: ClassVar[str] = "constant"
    value: float = 1.0

    def scales(self, step: ScheduleStep) -> torch.Tensor:
        return torch.full((len(step.generated),), self.value)


LLAMA_PROMPTS = [
    "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples are left? Think step by step.",
    "A train travels 60 km per hour for 2.5 hours. How far does it go? Explain your reasoning.",
    "What is the sum of the first 10 positive integers? Show your work.",
]


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_llamacpp_runs_schedules_by_equal_scale_groups(monkeypatch):
    """On llama.cpp a schedule is exact by construction (each step's rows decoded in groups of equal
    scale): a constant-1 schedule is plain steering and a constant-0 one steers only the prompt, token
    for token; real schedules agree with the torch engine's up to quantisation (as the rules do)."""
    import os

    from residlab import SteeringVector
    from residlab.engines import llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (`make install-llamacpp`).")
    monkeypatch.delenv("RESIDLAB_CACHE", raising=False)
    if os.environ.get("RESIDLAB_REAL_CACHE"):
        monkeypatch.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])
    model = "qwen2.5-coder-0.5b-instruct"
    with open_engine(model, "llamacpp") as llama, open_engine(model, "torch", dtype="float32") as torch_engine:
        g = torch.Generator().manual_seed(5)
        direction = torch.randn(llama.hidden_size, generator=g)
        vec = SteeringVector.from_layers({10: direction / direction.norm()}, model=llama)
        greedy = SamplingParams(20)

        def run(engine, rule, schedule=None):
            spec = SteeringSpec(vec, 6.0, rule, schedule=schedule)
            return [g.token_ids for g in engine.generate(LLAMA_PROMPTS, greedy, steering=spec, batch_size=3)]

        assert run(llama, "all", Constant(1.0)) == run(llama, "all")
        assert run(llama, "all", Constant(0.0)) == run(llama, "prompt")
        for schedule in (StepBoundaries(), EntropyScaled()):
            got, want = (
                run(llama, "prompt_last+generated", schedule),
                run(torch_engine, "prompt_last+generated", schedule),
            )
            shared = sum(
                next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                for a, b in zip(got, want, strict=True)
            )
            assert shared >= 0.6 * sum(len(w) for w in want), schedule.name
