"""The whole ASC pipeline through the CLI on a tiny model and the synthetic problems (seconds)."""

import json

from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "200"})


def strict_json(path):
    """Parse as standard JSON: a bare NaN or Infinity (which Python's json writes by default) fails."""

    def refuse(constant):
        raise AssertionError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_compress_sweep_and_eval_smoke(tmp_path):
    model = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    work = tmp_path / "out"
    common = "--dtype float32 --max-new-tokens 12 --batch-size 4".split() + ["--model", model, "--work-dir", str(work)]
    compress_args = [
        "compress",
        *common,
        *"--pairs 6 --pairs-dataset synthetic --keep all --eval synthetic --limit 4 --calibration-states 2".split(),
    ]
    result = runner.invoke(app, compress_args)
    assert result.exit_code == 0, result.output
    run_dir = work / "tiny"
    report = strict_json(run_dir / "report.json")
    assert set(report["conditions"]) == {"baseline", "asc"}
    assert report["method"] == "learned" and len(report["learned"]["history"]) == 12
    assert report["n_pairs"] == 6 and report["n_eval"] == 4
    assert report["strength"] > 0 and report["strength_applies_to"] == "unit vector"
    # The KL bound is opt-in (loose by ~10^6 on real models, minutes of float32 work on a CPU).
    assert report["calibration"] is None and "KL bound not computed" in (run_dir / "report.md").read_text()
    for name in (
        "report.md",
        "accuracy_vs_tokens.png",
        "token_histogram.png",
        "concise.safetensors",
        "vector_all_layers.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert "accuracy (95% CI)" in (run_dir / "report.md").read_text()
    # The tiny model is not tuned: the layer comes from the separation, the strength is the default,
    # and the config in the report shows the strength the run used.
    assert report["steering_sources"] == {"layer": "separation", "strength": "default"}
    assert report["config"]["strength"] == 0.25 and report["config"]["layer"] is None

    # A second run reuses every record: no new lines anywhere.
    sizes = {p: p.stat().st_size for p in run_dir.rglob("*.jsonl")}
    again = runner.invoke(app, compress_args)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_size for p in run_dir.rglob("*.jsonl")} == sizes
    # --kl-bound adds the bound to the report and changes nothing the run generates.
    bounded = runner.invoke(app, [*compress_args, "--kl-bound"])
    assert bounded.exit_code == 0, bounded.output
    with_bound = strict_json(run_dir / "report.json")
    assert 0 < with_bound["calibration"]["strength"] < float("inf")
    assert with_bound["strength"] == report["strength"]
    assert {p: p.stat().st_size for p in run_dir.rglob("*.jsonl")} == sizes

    vector_file = str(run_dir / "vector_all_layers.safetensors")
    sweep_args = "--layers 0:3 --strengths 0,0.5 --dataset synthetic --limit 2 --offset 0 --positions generated,all"
    sweep = runner.invoke(app, ["sweep", *common, "--vector", vector_file, *sweep_args.split()])
    assert sweep.exit_code == 0, sweep.output
    swept = strict_json(run_dir / "sweep.json")
    rows = swept["rows"]
    assert len(rows) == 3 * 2 * 2 + 2  # the grid and the two prompt baselines
    assert {r["template"] for r in rows if r["layer"] < 0} == {"concise_prompt", "chain_of_draft"}
    assert all(len(r["correct"]) == len(r["tokens"]) == 2 for r in rows)
    assert set(swept["frontier"]["references"]) == {"baseline", "concise_prompt", "chain_of_draft"}
    assert len(swept["frontier"]["methods"]) == 3 * 2  # one per layer x position rule
    for summary in swept["frontier"]["methods"].values():
        assert 0.0 <= summary["estimate"] <= 1.0 and summary["tolerance"] == 0.02
    assert (run_dir / "sweep.png").is_file() and (run_dir / "frontier.png").is_file()
    more_args = sweep_args.replace("0,0.5", "1").split() + ["--adaptive", "constant,until-answer"]
    more = runner.invoke(app, ["sweep", *common, "--vector", vector_file, *more_args])
    assert more.exit_code == 0, more.output
    rows = strict_json(run_dir / "sweep.json")["rows"]
    assert len(rows) == 3 * 2 * 2 + 2 + 3 * 2 * 2  # results accumulate; prompt baselines replaced
    assert {r["schedule"] for r in rows if r["relative_strength"] == 1} == {None, "until-answer"}

    eval_args = ["--dataset", "synthetic", "--limit", "2", "--strength", "auto"]
    eval_args += ["--calibration-dataset", "synthetic", "--calibration-states", "2"]
    evaluated = runner.invoke(app, ["eval", *common, *eval_args, "--vector", str(run_dir / "concise.safetensors")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "baseline+vector" in evaluated.output
    assert f"auto strength at layer {report['layer']}:" in evaluated.output  # the layer the vector records
    # A multi-layer vector records no steering layer: auto cannot guess one.
    multi = runner.invoke(app, ["eval", *common, *eval_args, "--vector", vector_file])
    assert multi.exit_code == 2 and "records no steering layer" in multi.output, multi.output


def test_eval_auto_strength_is_the_calibration_compress_ran(tmp_path):
    """One calibration for both: on the problems compress calibrated on, eval's auto strength for the
    saved vector is the KL-bound strength compress reported."""
    import pytest

    from residlab import SteeringVector
    from residlab.methods.asc import CalibrationProblems, CompressConfig, calibrate_vector

    model = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    args = "--dtype float32 --max-new-tokens 8 --batch-size 4 --pairs 4 --pairs-dataset synthetic --keep all"
    args += " --eval synthetic --limit 2 --calibration-states 2 --strength auto --method mean_diff"
    result = runner.invoke(app, ["compress", "--model", model, "--work-dir", str(tmp_path / "out"), *args.split()])
    assert result.exit_code == 0, result.output
    report = strict_json(tmp_path / "out" / "tiny" / "report.json")
    assert report["strength"] == report["calibration"]["strength"] and report["config"]["strength"] == "auto"
    saved = SteeringVector.load(report["vector"])
    cfg = CompressConfig(model=model, pairs_dataset="synthetic", pairs=4, calibration_states=2)
    unit, calibrated = calibrate_vector(model, saved, CalibrationProblems.after_pairs(cfg), eps=1e-3)
    assert unit.layers == [report["layer"]]
    assert calibrated.strength == pytest.approx(report["strength"], rel=1e-4)


def test_compress_with_missing_data_dir_is_a_clear_error(tmp_path):
    model = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    result = runner.invoke(
        app, ["compress", "--model", model, "--data-dir", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "hint:" in result.output and "Traceback" not in result.output
    same = runner.invoke(
        app, ["compress", "--model", model, "--project-out", "reference", "--work-dir", str(tmp_path / "o")]
    )
    assert same.exit_code == 2 and "is the pair source itself" in same.output
    idle = runner.invoke(
        app, ["compress", "--model", model, "--teacher-concurrency", "0", "--work-dir", str(tmp_path / "o")]
    )
    assert idle.exit_code == 2 and "--teacher-concurrency" in idle.output


def test_compress_can_project_out_a_second_pair_source(tmp_path):
    model = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    work = tmp_path / "out"
    args = "--dtype float32 --max-new-tokens 8 --batch-size 4 --pairs 4 --pairs-dataset synthetic --keep all"
    args += " --eval synthetic --limit 2 --calibration-states 2 --project-out sampled --pair-samples 2"
    result = runner.invoke(app, ["compress", "--model", model, "--work-dir", str(work), *args.split()])
    assert result.exit_code == 0, result.output
    run_dir = work / "tiny"
    report = strict_json(run_dir / "report.json")
    control = report["pairs"]["projected_out"]
    assert control["source"] == "sampled" and control["n_pairs"] == 4
    assert len(list((run_dir / "pairs").glob("sample-*.jsonl"))) == 2
    from residlab import SteeringVector

    full = SteeringVector.load(run_dir / "vector_all_layers.safetensors")
    assert full.info["projected_out"] == "sampled"
    assert set(control["cosine_per_layer"]) == {str(k) for k in full.layers}
    assert "minus its component along the sampled" in (run_dir / "report.md").read_text()


def test_compress_command_defaults_are_the_config_defaults():
    """The CLI states its defaults for typer's help; they must be the config's (what `make demo` runs)."""
    import inspect

    from residlab.cli.asc_commands import compress
    from residlab.methods.asc import CompressConfig

    params = inspect.signature(compress).parameters
    config = CompressConfig()
    names = ("pairs", "limit", "method", "learn_steps", "learn_window", "learn_pairs_per_step", "batch_size")
    for name in (*names, "max_new_tokens"):
        if name in params:
            assert params[name].default == getattr(config, name), name
    assert (config.pairs, config.limit) == (16, 30)  # sized so `make demo` fits 15 minutes (README)
