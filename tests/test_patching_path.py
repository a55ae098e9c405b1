"""Gradients along the input path (--ig-steps): the points, the embedding mix, the average, and that a
linear model still gives the exact effects."""

from __future__ import annotations

import pytest
import torch

from residlab.analyses.patching.activations import last_logits, record_values
from residlab.analyses.patching.attribution import InputPath, attribute
from residlab.analyses.patching.faithfulness import measure_faithfulness
from residlab.analyses.patching.metrics import MetricTargets, get_metric
from residlab.analyses.patching.pairs import encode_pairs
from residlab.analyses.patching.path import embeddings_between, path_points
from residlab.analyses.patching.relp import RelpRules
from residlab.analyses.patching.report import PatchingResult
from residlab.core.errors import ResidlabError
from residlab.testing import tiny_model
from tests.test_patching_relp import PAIRS


def test_path_points_are_midpoints_of_equal_segments():
    assert path_points(0) == (0.0,)
    assert path_points(1) == (0.5,)
    assert path_points(4) == (0.125, 0.375, 0.625, 0.875)
    with pytest.raises(ResidlabError, match="--ig-steps"):
        path_points(-1)


def test_embeddings_between_runs_the_corrupted_ids_as_either_end_and_leaves_no_hook(lm):
    from tests.conftest import hook_keys  # noqa: PLC0415

    before = hook_keys(lm)
    batch = encode_pairs(lm, PAIRS)
    ids, mask = batch.corrupted_ids, batch.attention_mask
    real = mask[:, -1].bool()
    with torch.no_grad():
        clean, corrupted = last_logits(lm, batch.clean_ids, mask), last_logits(lm, ids, mask)
        with embeddings_between(lm, batch.clean_ids, ids, 1.0):
            at_clean = last_logits(lm, ids, mask)
        with embeddings_between(lm, batch.clean_ids, ids, 0.0):
            at_corrupted = last_logits(lm, ids, mask)
        with embeddings_between(lm, batch.clean_ids, ids, 0.5):
            halfway = last_logits(lm, ids, mask)
    assert torch.allclose(at_clean[real], clean[real], atol=1e-4)
    assert torch.allclose(at_corrupted[real], corrupted[real], atol=1e-4)
    assert not torch.allclose(halfway, clean) and not torch.allclose(halfway, corrupted)
    assert hook_keys(lm) == before


def test_embeddings_between_refuses_other_prompts(qwen):
    batch = encode_pairs(qwen, PAIRS)
    with pytest.raises(ResidlabError, match="same number of tokens"):
        with embeddings_between(qwen, batch.clean_ids[:, 1:], batch.corrupted_ids, 0.5):
            pass
    with pytest.raises(ResidlabError, match="other prompts"):
        with embeddings_between(qwen, batch.clean_ids, batch.corrupted_ids, 0.5), torch.no_grad():
            last_logits(qwen, batch.corrupted_ids[:1], batch.attention_mask[:1])


@pytest.mark.parametrize("rules", [None, RelpRules()], ids=["atp", "relp"])
def test_path_gradients_are_the_mean_of_the_points(qwen, rules):
    batch = encode_pairs(qwen, PAIRS)
    ids, mask = batch.corrupted_ids, batch.attention_mask
    layers = list(range(qwen.num_layers))
    clean = record_values(qwen, batch.clean_ids, mask, ["block", "attn_heads"], layers)
    corrupted = record_values(qwen, ids, mask, ["block", "attn_heads"], layers)
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.log_softmax(-1))
    metric, keys = get_metric("logit_diff"), list(clean.values)
    path = attribute(qwen, ids, mask, targets, metric, keys, rules, InputPath(batch.clean_ids, 2))
    points = []
    for alpha in (0.25, 0.75):
        with embeddings_between(qwen, batch.clean_ids, ids, alpha):
            points.append(attribute(qwen, ids, mask, targets, metric, keys, rules))
    plain = attribute(qwen, ids, mask, targets, metric, keys, rules)
    assert path.steps == 2 and plain.steps == 0
    real = mask.bool()
    for key in keys:
        want = (points[0].grads[key] + points[1].grads[key]) / 2
        scale = want[real].abs().max().clamp_min(1e-6)
        assert (path.grads[key][real] - want[real]).abs().max() <= 1e-4 * scale, key
        # the deltas start at the corrupted run, not at a point of the path
        assert torch.allclose(path.values[key][real], corrupted.values[key][real], atol=1e-4)
    assert not torch.allclose(path.grads[0, "block"][real], plain.grads[0, "block"][real])


def test_each_rule_set_gets_its_own_path_average_and_no_hook_stays(qwen):
    """Several rule sets along one path: each set's gradients are the mean of that set's own gradients
    at the points; closing the generator early leaves no hook on the model."""
    from contextlib import closing

    from residlab.analyses.patching.attribution import attribute_each
    from tests.conftest import hook_keys  # noqa: PLC0415

    before = hook_keys(qwen)
    batch = encode_pairs(qwen, PAIRS)
    ids, mask = batch.corrupted_ids, batch.attention_mask
    clean = record_values(qwen, batch.clean_ids, mask, ["block"], list(range(qwen.num_layers)))
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.log_softmax(-1))
    metric, keys = get_metric("logit_diff"), list(clean.values)
    sets = [None, RelpRules()]
    together = list(attribute_each(qwen, ids, mask, targets, metric, keys, sets, InputPath(batch.clean_ids, 2)))
    real = mask.bool()
    for rules, attribution in zip(sets, together, strict=True):
        points = []
        for alpha in (0.25, 0.75):
            with embeddings_between(qwen, batch.clean_ids, ids, alpha):
                points.append(attribute(qwen, ids, mask, targets, metric, keys, rules))
        for key in keys:
            want = (points[0].grads[key] + points[1].grads[key]) / 2
            scale = want[real].abs().max().clamp_min(1e-6)
            assert (attribution.grads[key][real] - want[real]).abs().max() <= 1e-4 * scale, (rules, key)
    assert not torch.allclose(together[0].grads[0, "block"][real], together[1].grads[0, "block"][real])
    with closing(attribute_each(qwen, ids, mask, targets, metric, keys, sets, InputPath(batch.clean_ids, 3))) as gen:
        next(gen)  # stop after the first set
    assert hook_keys(qwen) == before
    with pytest.raises(ResidlabError, match="must be 0 or more"):
        InputPath(batch.clean_ids, -2)


def test_faithfulness_with_path_steps_records_them(qwen, tmp_path):
    run = measure_faithfulness(qwen, PAIRS, families=("resid", "heads"), ig_steps=2)
    plain = measure_faithfulness(qwen, PAIRS, families=("resid", "heads"))
    assert run.ig_steps == 2 and plain.ig_steps == 0
    resid, plain_resid = run.families[0], plain.families[0]
    assert resid.effects["exact"] == plain_resid.effects["exact"]  # exact patching does not move
    assert resid.effects["relp"] != plain_resid.effects["relp"]
    result = PatchingResult.from_run(run, model="tiny", architecture="qwen2", dataset="pairs")
    result.save(tmp_path)
    assert "averaged over 2 points of the input path" in (tmp_path / "report.md").read_text()
    assert '"ig_steps": 2' in (tmp_path / "patching.json").read_text()
    with pytest.raises(ResidlabError, match="--ig-steps"):
        measure_faithfulness(qwen, PAIRS, families=("resid",), ig_steps=-1)


def test_path_runs_take_the_path_table_and_say_so(monkeypatch):
    from residlab.analyses.patching import relp_defaults
    from residlab.analyses.patching.relp_defaults import FamilyRules, choose_rules

    for family, rules in relp_defaults.PATH_RULES.items():  # every path entry has its one-point default too
        assert family in relp_defaults.DEFAULT_RULES and isinstance(rules, FamilyRules)
    assert choose_rules("qwen2", along_path=True).rules == relp_defaults.PATH_RULES["qwen2"]
    assert choose_rules("qwen2", along_path=True).source.startswith("input-path default for qwen2")
    assert choose_rules("qwen2").rules == relp_defaults.DEFAULT_RULES["qwen2"]
    monkeypatch.delitem(relp_defaults.PATH_RULES, "gemma3_text", raising=False)
    fallback = choose_rules("gemma3_text", along_path=True)
    assert fallback.rules == relp_defaults.DEFAULT_RULES["gemma3_text"]
    assert "no input-path choice measured" in fallback.source
    explicit = choose_rules("qwen2", RelpRules(norm=False), along_path=True)
    assert explicit.rules == FamilyRules(RelpRules(norm=False)) and explicit.source.startswith("explicit")
    run = measure_faithfulness(tiny_model("qwen2"), PAIRS, families=("resid", "attn"), methods=("relp",), ig_steps=2)
    assert run.rules_source.startswith("input-path default for qwen2")
    assert any(line.startswith("[attn] none") for line in run.rules)  # attn/heads: the plain gradient


def test_patch_command_takes_ig_steps(tmp_path):
    import json

    from typer.testing import CliRunner

    from residlab.cli.main import app
    from residlab.testing import save_tiny_model

    model = str(save_tiny_model(tmp_path / "tiny-qwen", "qwen2"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p.__dict__) + "\n" for p in PAIRS))
    runner = CliRunner(env={"COLUMNS": "200"})
    out = tmp_path / "out"
    args = ["patch", "-m", model, "--dataset", str(pairs), "--sites", "resid", "--ig-steps", "3", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "patching.json").read_text())["ig_steps"] == 3
    assert "averaged over 3 points of the input path" in (out / "report.md").read_text()
    bad = runner.invoke(app, [*args[:-4], "--ig-steps", "-1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and not (tmp_path / "bad").exists()
