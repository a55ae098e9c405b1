"""The ASC vector methods beyond the mean difference: prompt-contrast and the learned vector."""

from __future__ import annotations

import pytest
import torch

from residlab import ResidlabError
from residlab.data import load_problems
from residlab.methods.asc import prompts
from residlab.methods.asc.prompt_contrast import prompt_contrast_vector, prompt_requests, shared_suffix
from residlab.recipes.extraction import read_states
from residlab.recipes.learned_vector import (
    LearnSettings,
    PreferencePair,
    _batch,
    energies,
    learn_vector,
)

PAIRS = [
    PreferencePair("Q: 2+3?\nA:", " 2+3=5. \\boxed{5}", " We add two and three, which gives five in total. \\boxed{5}"),
    PreferencePair(
        "Q: 4*2?\nA:", " 4*2=8. \\boxed{8}", " Four groups of two make eight when we count them. \\boxed{8}"
    ),
]
GENERAL = ["The river rose slowly through the night.", "Farmers moved their animals to higher ground."]


def test_shared_suffix():
    assert shared_suffix([1, 2, 3, 4], [9, 3, 4]) == 2
    assert shared_suffix([1, 2], [3, 4]) == 0
    assert shared_suffix([5], [5]) == 1


def test_prompt_contrast_reads_the_shared_tail_and_is_the_mean_difference(qwen):
    problems = load_problems("synthetic", "train", limit=4)
    concise, plain = prompt_requests(qwen, problems, prompts.CONCISE)
    for c, p in zip(concise, plain, strict=True):
        tail = -c.read.start
        assert tail >= 1 and c.token_ids[-tail:] == p.token_ids[-tail:]  # the same tokens are read
        assert c.token_ids != p.token_ids
    extraction, stats = prompt_contrast_vector(qwen, problems)
    states = read_states(qwen, concise + plain, range(qwen.num_layers))
    by_hand = states[:4].mean(0) - states[4:].mean(0)
    for layer in range(qwen.num_layers):
        torch.testing.assert_close(extraction.vector.directions[layer], by_hand[layer], rtol=1e-4, atol=1e-5)
    assert stats.n_pairs == 4 and stats.mean_concise_tokens > 0
    assert extraction.vector.info["concise_source"] == "prompt-contrast"
    with pytest.raises(ResidlabError, match="at least two"):
        prompt_contrast_vector(qwen, problems[:1])


def _parameters(lm):
    return {name: (p.detach().clone(), p.requires_grad) for name, p in lm.model.named_parameters()}


def test_learned_vector_lowers_the_loss_and_only_the_vector_changes(qwen):
    before = _parameters(qwen)
    initial = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    settings = LearnSettings(layer=1, steps=12, learning_rate=0.5, kl_eps=0.5, pairs_per_step=2)
    learned = learn_vector(qwen, PAIRS, GENERAL, initial, settings)
    after = _parameters(qwen)
    assert before.keys() == after.keys()
    for name, (tensor, flag) in before.items():
        assert torch.equal(tensor, after[name][0]) and flag == after[name][1], name
    assert not torch.equal(learned.vector, initial)
    history = learned.history
    assert len(history) == 12
    assert history[-1]["preference"] < history[0]["preference"]
    # The margin (E(preferred) - E(dispreferred)) moved in the preferred direction under the trained vector.
    batch, heads = _batch(
        qwen, [p.prompt for p in PAIRS] * 2, [p.preferred for p in PAIRS] + [p.dispreferred for p in PAIRS], 96
    )
    with torch.no_grad():
        e0 = energies(qwen, batch, heads, {1: initial})
        e1 = energies(qwen, batch, heads, {1: learned.vector})
    assert float((e1[:2] - e1[2:]).mean()) < float((e0[:2] - e0[2:]).mean())


def test_energies_from_the_last_logits_only_equal_the_full_computation(lm, monkeypatch):
    assert lm.accepts_logits_to_keep  # every tiny family: the fast path is the one compared
    heads = [p.prompt for p in PAIRS] + ["Q: a much longer question, padded less than the others?\nA:"]
    tails = [p.preferred for p in PAIRS] + [" short"]
    batch, heads_len = _batch(lm, heads, tails, 96)
    delta = {1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(6))}
    with torch.no_grad():
        fast = energies(lm, batch, heads_len, delta)
        monkeypatch.setattr(lm, "_accepts_logits_to_keep", False)
        full = energies(lm, batch, heads_len, delta)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_one_layer_checkpoints_keep_the_key_they_had_before_extra_layers_existed(qwen):
    import hashlib
    import json
    from dataclasses import asdict

    from residlab.recipes.learned_vector import _fingerprint

    settings = LearnSettings(layer=1, steps=3)
    # The key as computed before LearnSettings had also_layers: a one-layer run resumes its old checkpoint.
    defining = {k: v for k, v in asdict(settings).items() if k not in ("steps", "checkpoint_every", "also_layers")}
    digest = hashlib.sha256(json.dumps([qwen.name, str(qwen.dtype), defining], sort_keys=True).encode())
    for item in [*PAIRS, *GENERAL]:
        digest.update(json.dumps(asdict(item) if isinstance(item, PreferencePair) else item).encode())
    assert _fingerprint(qwen, settings, PAIRS, GENERAL) == digest.hexdigest()[:12]
    assert _fingerprint(qwen, LearnSettings(layer=1, also_layers=(2,)), PAIRS, GENERAL) != digest.hexdigest()[:12]


def test_learning_resumes_where_it_stopped(qwen, tmp_path):
    initial = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5
    straight = learn_vector(qwen, PAIRS, GENERAL, initial, LearnSettings(layer=1, steps=6, learning_rate=0.3))
    # A run stopped after 4 steps, then continued to 6 from its checkpoint (vector, Adam state, step).
    learn_vector(
        qwen, PAIRS, GENERAL, initial, LearnSettings(layer=1, steps=4, learning_rate=0.3), checkpoint_dir=tmp_path
    )
    (checkpoint,) = tmp_path.glob("learned-*.pt")
    assert torch.load(checkpoint, weights_only=False)["step"] == 4
    resumed = learn_vector(
        qwen, PAIRS, GENERAL, initial, LearnSettings(layer=1, steps=6, learning_rate=0.3), checkpoint_dir=tmp_path
    )
    assert torch.load(checkpoint, weights_only=False)["step"] == 6
    torch.testing.assert_close(resumed.vector, straight.vector, rtol=1e-5, atol=1e-6)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-4)


def test_learning_resumes_across_last_bit_changes_of_the_start_but_not_another_start(qwen, tmp_path):
    initial = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(2)) * 0.5
    settings = LearnSettings(layer=1, steps=2, learning_rate=0.3)
    learn_vector(qwen, PAIRS, GENERAL, initial, settings, checkpoint_dir=tmp_path)
    (checkpoint,) = tmp_path.glob("learned-*.pt")
    first = torch.load(checkpoint, weights_only=False)
    # The same extraction on other threads differs in its last bits: the checkpoint is used as it is.
    jittered = initial * (1 + 1e-6 * torch.randn(initial.shape, generator=torch.Generator().manual_seed(3)))
    logs: list[str] = []
    again = learn_vector(qwen, PAIRS, GENERAL, jittered, settings, checkpoint_dir=tmp_path, log=logs.append)
    assert logs == [] and torch.equal(again.vector, first["vector"])
    # Another starting vector under the same key learns again, and says so.
    other = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(4)) * 0.5
    fresh = learn_vector(qwen, PAIRS, GENERAL, other, settings, checkpoint_dir=tmp_path, log=logs.append)
    assert "started from another vector" in logs[0]
    assert len(fresh.history) == 2 and not torch.equal(fresh.vector, first["vector"])
    torch.testing.assert_close(torch.load(checkpoint, weights_only=False)["initial"], other)


def test_learn_settings_are_checked():
    with pytest.raises(ResidlabError, match="steps must be at least 1"):
        LearnSettings(layer=1, steps=0)
    with pytest.raises(ResidlabError, match="learning rate must be positive"):
        LearnSettings(layer=1, learning_rate=0.0)
    with pytest.raises(ResidlabError, match="repeat one"):
        LearnSettings(layer=1, also_layers=(2, 1))
    assert LearnSettings(layer=1, also_layers=(0, 2)).layers == (1, 0, 2)


def test_vectors_at_several_layers_train_jointly_and_each_moves(qwen, tmp_path):
    generator = torch.Generator().manual_seed(5)
    initial = torch.randn(2, qwen.hidden_size, generator=generator) * 0.5  # rows: layer 1, then layer 2
    settings = LearnSettings(layer=1, also_layers=(2,), steps=8, learning_rate=0.5, kl_eps=0.5, pairs_per_step=2)
    learned = learn_vector(qwen, PAIRS, GENERAL, initial, settings, checkpoint_dir=tmp_path)
    assert learned.vector.shape == initial.shape
    for row in range(2):
        assert not torch.allclose(learned.vector[row], initial[row])
    assert learned.history[-1]["preference"] < learned.history[0]["preference"]
    batch, heads = _batch(
        qwen, [p.prompt for p in PAIRS] * 2, [p.preferred for p in PAIRS] + [p.dispreferred for p in PAIRS], 96
    )
    with torch.no_grad():
        e0 = energies(qwen, batch, heads, {1: initial[0], 2: initial[1]})
        e1 = energies(qwen, batch, heads, {1: learned.vector[0], 2: learned.vector[1]})
        only_first = energies(qwen, batch, heads, {1: learned.vector[0]})
    assert float((e1[:2] - e1[2:]).mean()) < float((e0[:2] - e0[2:]).mean())
    assert not torch.allclose(e1, only_first)  # the second layer's delta is applied too
    # The two-layer run has its own checkpoint: a one-layer run at layer 1 does not resume from it.
    one = learn_vector(qwen, PAIRS, GENERAL, initial[0], LearnSettings(layer=1, steps=1), checkpoint_dir=tmp_path)
    assert len(one.history) == 1 and len(list(tmp_path.glob("learned-*.pt"))) == 2
    with pytest.raises(ResidlabError, match="starting vector has shape"):
        learn_vector(qwen, PAIRS, GENERAL, initial[0], settings)


def test_compress_with_each_new_method_and_adaptive_conditions(tmp_path):
    import json

    from typer.testing import CliRunner

    from residlab.cli.main import app
    from residlab.testing import save_tiny_model

    runner = CliRunner(env={"COLUMNS": "200"})
    model = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    common = [
        *"compress --dtype float32 --max-new-tokens 8 --batch-size 4 --pairs 4 --pairs-dataset synthetic".split(),
        *"--keep all --eval synthetic --limit 2 --calibration-states 2 --layer 1 --strength 0.3".split(),
        *["--model", model],
    ]
    work = tmp_path / "contrast"
    conditions = "baseline,asc,chain_of_draft,asc+chain_of_draft"
    args = [*common, "--work-dir", str(work), "--method", "prompt-contrast", "--adaptive", "until-answer"]
    result = runner.invoke(app, [*args, "--conditions", conditions])
    assert result.exit_code == 0, result.output
    report = json.loads((work / "tiny" / "report.json").read_text())
    assert report["method"] == "prompt-contrast" and report["pair_source"] == "prompt-contrast"
    assert list(report["conditions"]) == [
        "baseline",
        "asc-until-answer",
        "chain_of_draft",
        "asc-until-answer+chain_of_draft",
    ]
    assert not (work / "tiny" / "pairs").exists()  # no trace was generated

    work = tmp_path / "learned"
    learn = "--method learned --learn-steps 2 --learn-window 5 --learn-pairs-per-step 2"
    result = runner.invoke(app, [*common, "--work-dir", str(work), *learn.split()])
    assert result.exit_code == 0, result.output
    report = json.loads((work / "tiny" / "report.json").read_text())
    assert report["method"] == "learned" and len(report["learned"]["history"]) == 2
    settings = report["learned"]["settings"]
    assert (settings["max_completion_tokens"], settings["pairs_per_step"]) == (5, 2)
    # The strength used is the learned vector's own norm.
    assert report["strength"] == pytest.approx(report["learned"]["norm"], rel=1e-5)
    assert list((work / "tiny" / "learned").glob("learned-*.pt"))

    # Several layers: trained jointly, each saved in the vector file at its trained size relative to the main one.
    work = tmp_path / "learned-layers"
    result = runner.invoke(app, [*common, "--work-dir", str(work), *learn.split(), "--also-layers", "0,2"])
    assert result.exit_code == 0, result.output
    report = json.loads((work / "tiny" / "report.json").read_text())
    assert report["also_layers"] == [0, 2] and report["learned"]["layers"] == [1, 0, 2]
    from residlab.vectors.steering_vector import SteeringVector

    saved = SteeringVector.load(work / "tiny" / "concise.safetensors")
    trained = SteeringVector.load(work / "tiny" / "vector_all_layers.safetensors")
    assert saved.layers == [0, 1, 2]
    for k in (0, 1, 2):  # strength x direction = the trained delta at every layer
        delta = report["strength"] * saved.directions[k]
        torch.testing.assert_close(delta, trained.directions[k], rtol=1e-4, atol=1e-6)
    clash = runner.invoke(app, [*common, "--work-dir", str(work), "--also-layers", "1,2"])
    assert clash.exit_code != 0 and "includes the steering layer 1" in clash.output
    clash = runner.invoke(app, [*common, "--work-dir", str(work), "--also-layers", "2,2"])
    assert clash.exit_code != 0 and "repeats a layer" in clash.output
    clash = runner.invoke(app, [*common, "--work-dir", str(work), "--also-layers", "2", "--kl-bound"])
    assert clash.exit_code != 0 and "calibrated for one layer" in clash.output
    # Without --layer the steering layer is resolved later; it still may not be one of the extra layers.
    unnamed = [a for a in common if a not in ("--layer", "1")]
    assert len(unnamed) == len(common) - 2
    clash = runner.invoke(app, [*unnamed, "--work-dir", str(work), "--also-layers", "0,1,2", "--method", "mean_diff"])
    assert clash.exit_code != 0 and "includes the steering layer" in clash.output
    # The KL bound calibrates one layer: eval --strength auto refuses a vector that steers several.
    from residlab.methods.asc import CalibrationProblems, CompressConfig, calibrate_vector

    cfg = CompressConfig(model=model, pairs_dataset="synthetic", pairs=4, calibration_states=2)
    with pytest.raises(ResidlabError, match="calibrates one layer"):
        calibrate_vector(model, saved, CalibrationProblems.after_pairs(cfg), eps=1e-3)

    bad = runner.invoke(app, [*common, "--work-dir", str(work), "--adaptive", "sometimes"])
    assert bad.exit_code != 0 and "unknown adaptive strength" in bad.output


def _verbose_record(problem, output, correct):
    from residlab.evaluation.records import EvalRecord, problem_fingerprint

    return EvalRecord(
        id=problem.id, condition="verbose", output=output, tokens=40, hit_limit=False, seconds=0.1,
        batch_seconds=0.1, batch_size=1, extracted=problem.answer if correct else None, rule="boxed",
        gold=problem.answer, correct=correct, time=0.0, problem_sha=problem_fingerprint(problem),
    )  # fmt: skip


def test_rewrite_source_rewrites_only_correct_traces(qwen, tmp_path):
    from dataclasses import replace

    from residlab.evaluation.records import problem_fingerprint
    from residlab.evaluation.runner import Decoding
    from residlab.methods.asc.pairs import CONCISE_SOURCES, PairRequest
    from residlab.methods.asc.teacher import TeacherClient

    problems = load_problems("synthetic", "train", limit=3)
    traces = ["Half of 56 is 56 / 2 = 28, and 56 + 28 = 84. \\boxed{84}", "wrong", "Then 4 * 2 = 8 so \\boxed{8}"]
    verbose = [_verbose_record(p, t, c) for p, t, c in zip(problems, traces, [True, False, True], strict=True)]
    request = PairRequest(
        qwen, problems, verbose, Decoding(max_new_tokens=6), tmp_path, "both_correct", 1, None, None, False
    )
    by_model = CONCISE_SOURCES["rewrite"](request)
    assert by_model[1] == ("", False)  # a wrong verbose trace is not rewritten
    (records,) = tmp_path.glob("rewrite-*.jsonl")
    import json

    stored = [json.loads(line) for line in records.read_text().splitlines()]
    # The model was asked to rewrite each correct trace: the question it saw embeds that trace.
    expected = {
        problem_fingerprint(replace(p, question=prompts.REWRITE.format(question=p.question, trace=t)))
        for p, t in zip(problems, traces, strict=True)
    }
    assert {r["problem_sha"] for r in stored} <= expected and len(stored) == 2

    asked = []

    class Rewriter(TeacherClient):
        def __init__(self, url: str, dense: str) -> None:
            super().__init__(url)
            self.dense = dense

        def complete(self, question, max_tokens, template=prompts.CONCISE):
            asked.append(template.format(question=question))
            return self.dense if traces[0] in question else "\\boxed{-12345}"

    dense = Rewriter("http://127.0.0.1:9/v1", "56/2=28; 56+28=84 \\boxed{84}")
    by_teacher = CONCISE_SOURCES["rewrite"](replace(request, teacher=dense))
    assert [c.correct for c in by_teacher] == [True, False, False]  # kept only when it reaches the gold answer
    assert len(asked) == 2 and traces[0] in asked[0] and "minimal, dense derivation" in asked[0]
    # A "rewrite" that jumps to the answer reaches it, but is no derivation: dropped.
    jump = Rewriter("http://127.0.0.1:10/v1", "\\boxed{84}")
    assert [c.correct for c in CONCISE_SOURCES["rewrite"](replace(request, teacher=jump))] == [False, False, False]


def test_keeps_computations():
    from residlab.methods.asc.pairs import keeps_computations

    question = "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?"
    trace = "In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72 clips. \\boxed{72}"
    assert keeps_computations("48/2 = 24, 48 + 24 = 72. \\boxed{72}", trace, question)
    assert not keeps_computations("\\[\\boxed{72}\\]", trace, question)  # 1 of 3 intermediate numbers
    assert keeps_computations("24 + 48 = 72", trace, question, share=0.5)  # 24 and 72 of 2, 24, 72
    # The answer is no intermediate result: a bare answer fails even a two-step derivation.
    two_steps = "3 * 20 = 60 in all, and 20 + 60 = 80. \\boxed{80}"
    assert not keeps_computations("\\boxed{80}", two_steps, "20 apples, 3 times as many pears?", answer="80")
    assert keeps_computations("3*20=60; 20+60=80", two_steps, "20 apples, 3 times as many pears?", answer="80")
    assert keeps_computations("\\boxed{7}", "It is \\boxed{7}.", "What is 3 + 4?")  # the answer was all it had
    assert keeps_computations("anything", "3 + 4 gives the answer", "What is 3 + 4?")  # nothing intermediate
    # Written forms of one number agree: thousands commas, trailing zero decimals.
    assert keeps_computations("1000 + 2.5", "1,000 plus 2.50", "Add them.", share=1.0)
    assert keeps_computations("1{,}000 and 0.5", "1,000 and .5", "Add them.", share=1.0)
    assert not keeps_computations("12", "the pair (1,2)", "Which pair?", share=1.0)  # a list is two numbers


def test_vector_method_registry():
    from residlab.methods.asc.vector import build_concise_vector
    from residlab.methods.asc.vector_methods import VECTOR_METHODS, refine_learned, vector_method

    # The default method is the unchanged mean-difference stage (its vector stays bit-identical).
    assert vector_method("mean_diff").build is build_concise_vector and vector_method("mean_diff").refine is None
    assert vector_method("pca").build is build_concise_vector
    assert vector_method("learned").refine is refine_learned
    assert not VECTOR_METHODS["prompt-contrast"].needs_traces
    with pytest.raises(ResidlabError, match="unknown vector method"):
        vector_method("telepathy")


def _trace_pairs():
    from residlab.methods.asc.pairs import TracePair

    return [
        TracePair(
            f"p{a}x{b}",
            f"What is {a}*{b}?",
            f"We take {a} groups of {b}, which is {a * b} in all. \\boxed{{{a * b}}}",
            f"{a}*{b}={a * b} \\boxed{{{a * b}}}",
            14,
            6,
            True,
            True,
            "reference",
        )
        for a, b in [(2, 3), (4, 2), (5, 5), (3, 7), (6, 2), (9, 4)]
    ]


def test_extraction_is_cached_and_reused(qwen, tmp_path, monkeypatch):
    """A rerun on the same pairs reads the saved extraction (no forward pass); other pairs extract anew;
    an unreadable cache file is recomputed, not trusted."""
    from residlab.methods.asc import vector as vector_module

    pairs = _trace_pairs()
    first = vector_module.cached_extraction(qwen, pairs, tmp_path, log=lambda _: None)
    assert len(list(tmp_path.glob("extraction-*.safetensors"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("the extraction ran again")

    monkeypatch.setattr(vector_module, "extract_vector", no_forward)
    again = vector_module.cached_extraction(qwen, pairs, tmp_path, log=lambda _: None)
    for layer in first.vector.layers:
        torch.testing.assert_close(again.vector.directions[layer], first.vector.directions[layer], rtol=0, atol=0)
    assert again.separation == pytest.approx(first.separation)
    assert again.residual_norm == pytest.approx(first.residual_norm)
    assert (again.read, again.method, again.n_pairs) == (first.read, first.method, first.n_pairs)
    assert again.best_layer == first.best_layer

    with pytest.raises(AssertionError, match="ran again"):  # other pairs: another key, a new extraction
        vector_module.cached_extraction(qwen, pairs[:1], tmp_path, log=lambda _: None)
    monkeypatch.undo()
    stats = next(tmp_path.glob("extraction-*.json"))
    stats.write_text("{not json")
    messages: list[str] = []
    redone = vector_module.cached_extraction(qwen, pairs, tmp_path, log=messages.append)
    assert any("unreadable" in m for m in messages)
    torch.testing.assert_close(redone.vector.directions[0], first.vector.directions[0])


def test_extraction_shows_progress_over_both_sides(qwen, tmp_path, capsys):
    """The extraction is minutes of forward passes on a CPU for a hundred pairs: it shows a bar over
    each side's texts (concise, then verbose) unless asked not to, and a cache hit shows none."""
    from residlab.methods.asc import vector as vector_module

    pairs = _trace_pairs()
    vector_module.cached_extraction(qwen, pairs, tmp_path, log=lambda _: None)
    shown = capsys.readouterr().err
    for side in ("reading states (1/2)", "reading states (2/2)"):
        assert side in shown
        assert f"{side}: 100%" in shown and f"{len(pairs)}/{len(pairs)}" in shown
    vector_module.cached_extraction(qwen, pairs, tmp_path, log=lambda _: None)
    assert "reading states" not in capsys.readouterr().err
    vector_module.cached_extraction(qwen, pairs[:3], tmp_path / "other", log=lambda _: None, progress=False)
    assert "reading states" not in capsys.readouterr().err
