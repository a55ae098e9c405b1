"""The ASC stages one by one: the typed evaluation record, the pure steering resolution, the shared
calibration, the template map and the frozen config."""

import dataclasses
import json

import pytest
import torch

from residlab import ResidlabError, SteeringVector
from residlab.data import load_problems
from residlab.evaluation.records import FIELDS, EvalRecord
from residlab.evaluation.runner import Condition, Decoding, evaluate, records_path
from residlab.methods.asc import (
    TEMPLATES,
    CalibrationProblems,
    CompressConfig,
    calibrate_strength,
    compress_conditions,
    parse_strength,
    prompts,
    resolve_steering,
    template,
    vector_layer,
)
from residlab.methods.asc.steering import DEFAULT_RELATIVE_STRENGTH, choose_layer
from residlab.models.registry import packaged_model
from residlab.recipes.calibration import Calibration, calibrate

# A record line exactly as residlab has always written it (key order, rounding, non-ASCII as is).
LEGACY_LINE = (
    '{"id": "gsm8k-test-00007", "condition": "asc", "output": "½ of 3 € is \\\\boxed{1.5}", "tokens": 12, '
    '"hit_limit": false, "seconds": 0.1234, "batch_seconds": 0.9872, "batch_size": 8, "extracted": "1.5", '
    '"rule": "boxed", "gold": "1.5", "correct": true, "time": 1717171717.1}'
)


def test_eval_record_round_trips_byte_for_byte():
    record = EvalRecord.from_json(json.loads(LEGACY_LINE))
    assert record.tokens == 12 and record.correct and record.output.startswith("½")
    assert json.dumps(record.to_json(), ensure_ascii=False) == LEGACY_LINE
    assert FIELDS == (
        "id", "condition", "output", "tokens", "hit_limit", "seconds", "batch_seconds", "batch_size",
        "extracted", "rule", "gold", "correct", "time", "problem_sha",
    )  # fmt: skip
    no_answer = EvalRecord.from_json({**json.loads(LEGACY_LINE), "extracted": None, "correct": False})
    assert '"extracted": null' in json.dumps(no_answer.to_json()) and not no_answer.solved
    with pytest.raises(ResidlabError, match="lacks the field"):
        EvalRecord.from_json({"id": "x", "output": "y"})


def test_existing_record_files_are_reused_as_they_are(qwen, tmp_path, monkeypatch):
    problems = load_problems("synthetic", "test", limit=2)
    condition, decoding = Condition("baseline", "{question}"), Decoding(max_new_tokens=3, batch_size=2)
    path = records_path(tmp_path, condition, decoding, qwen)
    # legacy records (no problem_sha) are matched by their gold answer
    lines = [LEGACY_LINE.replace("gsm8k-test-00007", p.id).replace('"gold": "1.5"', f'"gold": "{p.answer}"')
             for p in problems]  # fmt: skip
    path.write_text("".join(line + "\n" for line in lines))

    def no_generation(*args, **kwargs):
        raise AssertionError("a stored record was generated again")

    monkeypatch.setattr(qwen, "generate", no_generation)
    records = evaluate(qwen, problems, condition, decoding, tmp_path, progress=False)
    assert [r.id for r in records] == [p.id for p in problems]
    assert [json.dumps(r.to_json(), ensure_ascii=False) for r in records] == lines
    assert path.read_text() == "".join(line + "\n" for line in lines)  # untouched


def test_a_record_file_with_foreign_records_names_its_file(qwen, tmp_path):
    problems = load_problems("synthetic", "test", limit=1)
    condition, decoding = Condition("b"), Decoding(max_new_tokens=3, batch_size=2)
    path = records_path(tmp_path, condition, decoding, qwen)
    path.write_text('{"id": "x"}\n')
    with pytest.raises(ResidlabError, match=r"record 1: an evaluation record lacks"):
        evaluate(qwen, problems, condition, decoding, tmp_path, progress=False)


def test_resolve_steering_says_where_layer_and_strength_came_from():
    separation = {0: 9.0, 1: 0.5, 2: 2.0, 3: 1.0, 4: 3.0, 5: 0.1, 6: 0.2, 7: 8.0}
    untuned = resolve_steering(None, None, tuned=None, separation=separation, num_layers=8)
    # the best separated layer of the middle half (2..5), not the global best (0 or 7)
    assert (untuned.layer, untuned.layer_source) == (4, "separation")
    assert (untuned.strength, untuned.strength_source) == (DEFAULT_RELATIVE_STRENGTH, "default")
    tuned = packaged_model("qwen2.5-coder-0.5b-instruct")
    from_registry = resolve_steering(None, None, tuned=tuned, separation=separation, num_layers=24)
    assert (from_registry.layer, from_registry.layer_source) == (tuned.asc_layer, "tuned")
    assert (from_registry.strength, from_registry.strength_source) == (tuned.asc_strength, "tuned")
    given = resolve_steering(-1, "auto", tuned=tuned, separation=separation, num_layers=24)
    assert (given.layer, given.layer_source, given.strength, given.strength_source) == (23, "option", "auto", "option")
    with pytest.raises(ResidlabError, match="layer 30 does not exist"):
        resolve_steering(30, None, tuned=None, separation=separation, num_layers=24)
    assert choose_layer({0: 1.0, 1: 2.0, 2: 9.0}, 3) == 1  # the middle half of 3 layers is 0..1
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.layer = 3  # type: ignore[misc]


def test_absolute_strength_follows_the_mode():
    calibration = Calibration(
        layer=1, eps=1e-3, a=2.0, lipschitz=1.0, strength=0.03, a_values=[2.0], l_values=[1.0], strength_centred=0.05
    )
    choice = resolve_steering(1, 0.4, tuned=None, separation={}, num_layers=3)
    assert choice.absolute_strength(20.0, calibration) == pytest.approx(8.0)
    assert dataclasses.replace(choice, strength="auto").absolute_strength(20.0, calibration) == 0.03
    assert dataclasses.replace(choice, strength="auto-centred").absolute_strength(20.0, calibration) == 0.05


def test_vector_layer_is_the_recorded_or_the_only_one(qwen):
    from conftest import random_vector

    multi = random_vector(qwen, [0, 1, 2])
    assert vector_layer(dataclasses.replace(multi, info={"layer": 2})) == 2
    assert vector_layer(random_vector(qwen, [1])) == 1
    with pytest.raises(ResidlabError, match="records no steering layer") as err:
        vector_layer(multi)
    assert "concise.safetensors" in err.value.hint
    with pytest.raises(ResidlabError, match="records layer 2 but"):
        vector_layer(dataclasses.replace(random_vector(qwen, [0, 1]), info={"layer": 2}))


def test_shared_calibration_uses_the_problems_it_is_given(qwen, monkeypatch):
    def no_second_model(*args, **kwargs):
        raise AssertionError("a float32 model must be reused, not loaded again")

    monkeypatch.setattr("residlab.methods.asc.calibration.load", no_second_model)
    direction = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(3))
    unit = direction / direction.norm()
    problems = CalibrationProblems(dataset="synthetic", offset=3, states=2)
    result = calibrate_strength("unused", problems, 1, unit, eps=1e-3, lm=qwen, choose=lambda c: 2 * c.strength)
    texts = [
        qwen.format_prompt(prompts.VERBOSE.format(question=p.question))
        for p in load_problems("synthetic", "train", offset=3, limit=4)
    ]
    direct = calibrate(qwen, texts[:2], texts[2:], 1, unit, eps=1e-3)
    assert result.calibration.a_values == direct.a_values  # the same two states, the next two held out
    assert result.calibration.measured_kl_median == direct.measured_kl_median
    assert result.strength == pytest.approx(2 * direct.strength)
    assert result.bound > direct.bound_at_strength  # twice the strength, a larger bound
    report = result.report()
    assert report["bound_at_used_strength"] == result.bound and report["a"] == direct.a


def test_calibration_problems_default_to_what_compress_uses():
    cfg = CompressConfig()
    assert CalibrationProblems() == CalibrationProblems.after_pairs(cfg)
    custom = CompressConfig(pairs_dataset="synthetic", pairs=6, calibration_states=2, data_dir="d")
    assert CalibrationProblems.after_pairs(custom) == CalibrationProblems("synthetic", 6, 2, "d")


def test_one_template_map_for_every_condition(qwen):
    from conftest import random_vector

    assert TEMPLATES == {
        "baseline": prompts.VERBOSE,
        "concise_prompt": prompts.CONCISE,
        "chain_of_draft": prompts.CHAIN_OF_DRAFT,
    }
    assert template("concise_prompt") == prompts.CONCISE
    with pytest.raises(ResidlabError, match="unknown template 'terse'"):
        template("terse")
    vector = random_vector(qwen, [1])
    names = ("baseline", "asc", "concise_prompt", "asc+concise_prompt")
    conditions = compress_conditions(names, vector, 2.5, "generated")
    assert [c.template for c in conditions] == [prompts.VERBOSE, prompts.VERBOSE, prompts.CONCISE, prompts.CONCISE]
    assert [c.steered for c in conditions] == [False, True, False, True]
    assert {c.strength for c in conditions if c.steered} == {2.5}
    assert {c.positions for c in conditions} == {"generated"}


def test_compress_config_is_frozen_and_checked():
    cfg = CompressConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.strength = 0.3  # type: ignore[misc]
    with pytest.raises(ResidlabError, match="is the pair source itself"):
        CompressConfig(pair_source="sampled", project_out="sampled")
    with pytest.raises(ResidlabError, match="unknown strength 'strong'"):
        CompressConfig(strength="strong")
    assert [parse_strength(t) for t in (None, "auto", "auto-centred", "0.35")] == [None, "auto", "auto-centred", 0.35]
    with pytest.raises(ResidlabError, match="cannot read the strength"):
        parse_strength("lots")


def test_one_vector_of_unit_norm_is_what_compress_saves(qwen):
    from residlab.methods.asc import ConciseVector, steering_vector
    from residlab.methods.asc.pairs import PairStats
    from residlab.recipes.extraction import ExtractionResult

    raw = SteeringVector.from_layers(
        {k: torch.full((qwen.hidden_size,), float(k + 1)) for k in range(3)}, model=qwen, info={"n_pairs": 2}
    )
    extraction = ExtractionResult(raw, {0: 1.0, 1: 2.0, 2: 0.5}, {0: 5.0, 1: 10.0, 2: 20.0}, "mean", "mean_diff", 2)
    concise = ConciseVector(extraction, PairStats(2, 2, {}, 30.0, 10.0))
    saved = steering_vector(concise, 1, 3.5, "generated", 0.9)
    assert saved.layers == [1] and float(saved.directions[1].norm()) == pytest.approx(1.0)
    assert saved.position_rule == "generated"
    assert saved.info == {
        "n_pairs": 2,
        "normalized": True,
        "strength": 3.5,
        "also_layers": [],
        "layer": 1,
        "raw_norm": pytest.approx(2.0 * qwen.hidden_size**0.5),
        "residual_norm": 10.0,
        "kl_bound_strength": 0.9,
    }
    # More layers: an extracted vector's other layers get the same relative strength (x their residual
    # norm, 5 and 20 against 10 here); a trained one's keep their trained sizes relative to the main layer.
    spread = steering_vector(concise, 1, 3.5, "generated", None, (0, 2))
    assert spread.layers == [0, 1, 2] and spread.info["also_layers"] == [0, 2]
    norms = {k: float(v.norm()) for k, v in spread.directions.items()}
    assert norms == {0: pytest.approx(0.5), 1: pytest.approx(1.0), 2: pytest.approx(2.0)}
    kept = steering_vector(concise, 1, 3.5, "generated", None, (0, 2), trained=True)
    for k in (0, 1, 2):
        torch.testing.assert_close(kept.directions[k] * raw.norm(1), raw.directions[k])
