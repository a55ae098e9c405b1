"""The llama.cpp engine against the torch engine on the real default model.

Both run the same GGUF (torch on its dequantised float32 copy, llama.cpp on the Q4 weights as they
are) and get the same token ids from the same tokenizer, so they must agree closely: unsteered
teacher-forced top-1 >= 95%, and a vector at residlab layer L must move llama.cpp's next-token
distribution as it moves torch's at L (and unlike at L - 1 or L + 1): the layer numbering test.

Skipped where llama-cpp-python is not installed, except under CI (CI=true), where that is a failure:
``make test`` installs it.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from residlab import ModelMismatchError, ResidlabError, SteeringVector
from residlab.engines import SamplingParams, SteeringSpec, llama_cpp_available, open_engine

pytestmark = [pytest.mark.real_model, pytest.mark.llamacpp]

MODEL = "qwen2.5-coder-0.5b-instruct"
# Real text: a GSM8K-style problem with a worked solution, plus plain prose.
TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? In May she sold 48 / 2 = 24 clips. "
    "Altogether she sold 48 + 24 = 72 clips in April and May. The answer is 72.\n\n"
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn? Weng earns 12 / 60 = $0.2 per minute. Working 50 minutes, she earned "
    "0.2 x 50 = $10. The answer is 10.\n\n"
    "The river rose slowly through the night, and by morning the fields along its banks were under "
    "water. Farmers moved their animals to higher ground while the town council met to decide how to "
    "repair the old stone bridge, which had stood for more than two hundred years."
)
PROMPTS = [
    "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples are left? Think step by step.",
    "A train travels 60 km per hour for 2.5 hours. How far does it go? Explain your reasoning.",
    "What is the sum of the first 10 positive integers? Show your work.",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def engines():
    if not llama_cpp_available():
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed under CI: `make test` should have installed it.")
        pytest.skip("llama-cpp-python is not installed (`make install-llamacpp`).")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RESIDLAB_CACHE", raising=False)
        if os.environ.get("RESIDLAB_REAL_CACHE"):
            mp.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])
        llama = open_engine(MODEL, "llamacpp")
        torch_engine = open_engine(MODEL, "torch", dtype="float32")
    with llama, torch_engine:
        yield torch_engine, llama


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p, q = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(p) * (p - q)).sum(-1)


def _vec(directions: dict[int, torch.Tensor]) -> SteeringVector:
    return SteeringVector(directions, model_name=MODEL, hidden_size=896, num_layers=24)


def _direction(seed: int, size: int) -> torch.Tensor:
    d = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def test_unsteered_teacher_forced_top1_agreement(engines):
    torch_engine, llama = engines
    assert (llama.num_layers, llama.hidden_size) == (torch_engine.num_layers, torch_engine.hidden_size)
    ids = torch_engine.tokenize(TEXT)
    a, b = torch_engine.score(ids), llama.score(ids)
    agreement = float((a.argmax(-1) == b.argmax(-1)).mean())
    assert len(ids) > 150 and agreement >= 0.95, agreement
    assert float(np.median(_kl(a, b))) < 0.01  # quantised vs dequantised weights: nearly the same model


@pytest.mark.parametrize(("layer", "strength"), [(2, 8.0), (11, 12.0), (20, 48.0)])  # residual norms grow with depth
def test_same_layer_number_steers_the_same_block(engines, layer, strength):
    torch_engine, llama = engines
    ids = torch_engine.tokenize(TEXT)[:96]
    base = torch_engine.score(ids)
    d = _direction(layer, torch_engine.hidden_size)
    vec = SteeringVector(
        {k: d for k in (layer - 1, layer, layer + 1)},
        model_name=MODEL,
        hidden_size=torch_engine.hidden_size,
        num_layers=torch_engine.num_layers,
    )
    steered_torch = torch_engine.score(ids, SteeringSpec(vec, strength, layers=(layer,)))
    moved = float(np.median(_kl(base, steered_torch)))
    assert moved > 0.02, "the test vector must move the distribution measurably"
    mismatch = {
        k: float(np.median(_kl(steered_torch, llama.score(ids, SteeringSpec(vec, strength, layers=(k,))))))
        for k in (layer - 1, layer, layer + 1)
    }
    # At the same number llama.cpp's steered distribution is the torch one (up to quantisation);
    # one block off it is clearly another.
    assert mismatch[layer] < 0.25 * min(mismatch[layer - 1], mismatch[layer + 1]), mismatch
    same = llama.score(ids, SteeringSpec(vec, strength, layers=(layer,)))
    assert float((same.argmax(-1) == steered_torch.argmax(-1)).mean()) >= 0.9


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_position_rules_match_the_torch_engine(engines):
    """Steered greedy generation agrees with torch for every rule llama.cpp supports. Tolerance:
    greedy decoding turns quantisation-sized logit differences at near ties into different tokens
    (unsteered, one of these prompts already diverges after 6 tokens), so we require 75% of the
    tokens to lie in the common prefix, not identical texts."""
    torch_engine, llama = engines
    vec = _vec({10: _direction(5, torch_engine.hidden_size)})
    for rule in ("prompt_last+generated", "all", "generated", "prompt"):
        spec = SteeringSpec(vec, 4.0, rule)
        got = llama.generate(PROMPTS, greedy(20), steering=spec, batch_size=4)
        want = torch_engine.generate(PROMPTS, greedy(20), steering=spec, batch_size=4)
        shared = sum(_common_prefix(g.token_ids, w.token_ids) for g, w in zip(got, want, strict=True))
        assert shared >= 0.75 * sum(len(w.token_ids) for w in want), (rule, [g.text for g in got])


def test_generated_rule_leaves_the_first_token_alone(engines):
    _, llama = engines
    vec = _vec({8: _direction(1, llama.hidden_size)})
    plain = [g.token_ids[0] for g in llama.generate(PROMPTS, greedy(1))]
    strong = 200.0  # so strong that any steered position changes the argmax
    generated = [
        g.token_ids[0] for g in llama.generate(PROMPTS, greedy(1), steering=SteeringSpec(vec, strong, "generated"))
    ]
    from_last = [
        g.token_ids[0]
        for g in llama.generate(PROMPTS, greedy(1), steering=SteeringSpec(vec, strong, "prompt_last+generated"))
    ]
    assert generated == plain
    assert from_last != plain


def test_batched_generation_keeps_rows_apart(engines):
    _, llama = engines
    prompts = [*PROMPTS, "Reply with the single word: yes."]
    batched = llama.generate(prompts, greedy(40), batch_size=5)
    single = llama.generate(prompts, greedy(40), batch_size=1)
    assert sum(b.token_ids == s.token_ids for b, s in zip(batched, single, strict=True)) >= 3
    short = batched[-1]
    assert not short.hit_limit and short.num_tokens < 10 and "yes" in short.text.lower()
    assert all(b.batch_size == 5 for b in batched)


def test_control_vector_file_steers_like_the_vector(engines, tmp_path):
    from residlab.vectors.gguf_control import export_control_vector, import_control_vector

    torch_engine, llama = engines
    vec = _vec({6: _direction(2, llama.hidden_size), 7: _direction(3, llama.hidden_size)})
    vec = SteeringVector(**{**vec.__dict__, "info": {"strength": 9.0}})
    back = import_control_vector(export_control_vector(vec, tmp_path / "v.gguf"), llama)
    ids = torch_engine.tokenize(TEXT)[:48]
    np.testing.assert_allclose(
        llama.score(ids, SteeringSpec(back, 9.0)), llama.score(ids, SteeringSpec(vec, 9.0)), rtol=1e-4, atol=1e-4
    )


def test_unsupported_requests_are_clear_errors(engines):
    torch_engine, llama = engines
    assert (llama.first_steerable_layer, torch_engine.first_steerable_layer) == (1, 0)  # compress checks it early
    vec = _vec({0: _direction(0, llama.hidden_size)})
    with pytest.raises(ResidlabError, match="layer 0"):
        llama.generate(PROMPTS[:1], greedy(2), steering=SteeringSpec(vec, 1.0, "all"))
    vec = _vec({4: _direction(0, llama.hidden_size)})
    with pytest.raises(ResidlabError, match="position rules"):
        llama.generate(PROMPTS[:1], greedy(2), steering=SteeringSpec(vec, 1.0, (0, -1)))  # type: ignore[arg-type]
    other = SteeringVector({1: torch.ones(64)}, model_name="tiny", hidden_size=64, num_layers=3)
    with pytest.raises(ModelMismatchError, match="hidden size"):
        llama.generate(PROMPTS[:1], greedy(2), steering=SteeringSpec(other, 1.0))


def test_seeded_sampling_is_reproducible(engines):
    _, llama = engines
    hot = SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.95, seed=11)
    first = [g.token_ids for g in llama.generate(PROMPTS, hot, batch_size=2)]
    assert first == [g.token_ids for g in llama.generate(PROMPTS, hot, batch_size=2)]
    assert first != [g.token_ids for g in llama.generate(PROMPTS, replace(hot, seed=12), batch_size=2)]
    fixed = llama.generate(PROMPTS[:2], SamplingParams(max_new_tokens=7, ignore_eos=True))
    assert all(g.num_tokens == 7 and g.hit_limit for g in fixed)


def test_engine_frees_llama_cpp_on_leaving_the_with_block(engines):
    from residlab.engines.llamacpp import LlamaCppEngine

    torch_engine, llama = engines
    with LlamaCppEngine(llama.gguf_path, llama.tokenizer, name=MODEL, eos_ids=llama.eos_ids) as extra:
        ids = torch_engine.tokenize(TEXT)[:8]
        np.testing.assert_allclose(extra.score(ids), llama.score(ids), rtol=1e-4, atol=1e-4)
    assert extra._model is None and extra._ctx is None


def test_usable_cores_follows_the_affinity_mask():
    import os

    from residlab.engines.llamacpp import usable_cores

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity masks on this platform")
    everything = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(everything)})
        assert usable_cores() == 1
    finally:
        os.sched_setaffinity(0, everything)
    assert usable_cores() == len(everything)
