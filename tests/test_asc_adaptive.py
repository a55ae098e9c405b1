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
    EntropyScaled,
    ScheduleStep,
    StepBoundaries,
    StrengthSchedule,
    UntilAnswer,
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
    assert set(SCHEDULES) == {"until-answer", "step-boundaries", "entropy"}
    assert strength_schedule(None) is None and isinstance(strength_schedule("entropy"), EntropyScaled)
    with pytest.raises(ResidlabError, match="unknown adaptive strength"):
        strength_schedule("sometimes")


def test_position_scales_map_generated_positions():
    positions = torch.tensor([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
    prompts = torch.tensor([2, 3])
    generated = torch.tensor([[0.5, 0.0], [2.0, 3.0]])
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 2.0, 3.0]])
    assert torch.equal(position_scales(positions, prompts, generated), expected)


SCHEDULE_CASES = [OddTokens(), EntropyScaled(reference=1.0, cap=10.0), StepBoundaries(), UntilAnswer()]


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
    @dataclass(frozen=True)
    class Constant(StrengthSchedule):
        name: ClassVar[str] = "constant"
        value: float = 1.0

        def scales(self, step):
            return torch.full((len(step.generated),), self.value)

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
