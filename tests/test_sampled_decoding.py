"""Sampled decoding in compress, sweep and eval (reasoning models loop when greedy), and the warning when
answers run into the token budget."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.core.errors import ResidlabError
from residlab.evaluation.report import CUT_OFF_WARNING_SHARE, ConditionSummary, cut_off_warning
from residlab.evaluation.runner import Decoding
from residlab.methods.asc import CompressConfig
from residlab.methods.sweep import SweepConfig
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "200"})
SAMPLED = ["--temperature", "0.7", "--top-p", "0.9", "--seed", "3"]


def _summary(share: float, n: int = 20) -> ConditionSummary:
    return ConditionSummary("baseline", n, 0.5, (0.3, 0.7), 100.0, 100.0, share, 1.0, {})


def test_cut_off_warning_fires_from_its_share_on_and_says_what_to_do() -> None:
    assert cut_off_warning(_summary(CUT_OFF_WARNING_SHARE - 0.05), 512) is None
    assert cut_off_warning(_summary(float("nan"), n=0), 512) is None
    message = cut_off_warning(_summary(0.25), 512)
    assert message is not None
    assert message.startswith("warning: 25% of the baseline answers (5 of 20) stopped at 512 new tokens")
    assert "\nhint: raise --max-new-tokens" in message


def test_decoding_describes_itself_and_bad_sampling_fails_before_any_work() -> None:
    assert Decoding().describe() == "greedy"
    assert Decoding(temperature=0.7, top_p=0.9, seed=3).describe() == "sampled at temperature 0.7, top-p 0.9, seed 3"
    assert CompressConfig(temperature=0.7, top_p=0.9, seed=3).decoding() == Decoding(512, 0.7, 0.9, 3, 8)
    # The default is the greedy decoding every earlier record was made with: their caches stay valid.
    assert CompressConfig().decoding() == Decoding(max_new_tokens=512, batch_size=8)
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"temperature": math.nan}):
        with pytest.raises(ResidlabError):
            CompressConfig(**bad)  # type: ignore[arg-type]
        with pytest.raises(ResidlabError):
            SweepConfig(**bad)  # type: ignore[arg-type]


def test_compress_sweep_and_eval_sample_when_asked_and_warn_on_cut_off_answers(tmp_path) -> None:
    model = str(save_tiny_model(tmp_path / "tiny", "qwen2"))
    work = tmp_path / "out"
    common = "--dtype float32 --max-new-tokens 12 --batch-size 4".split() + ["--model", model, "--work-dir", str(work)]
    compress = ["compress", *common, *"--pairs 4 --pairs-dataset synthetic --keep all --eval synthetic".split()]
    compress += "--limit 4 --calibration-states 2 --method mean_diff".split()
    run_dir = work / "tiny"

    greedy = runner.invoke(app, compress)
    assert greedy.exit_code == 0, greedy.output
    greedy_files = {p.name for p in (run_dir / "runs").glob("*.jsonl")}
    sampled = runner.invoke(app, [*compress, *SAMPLED])
    assert sampled.exit_code == 0, sampled.output
    # A random tiny model never closes its answer in 12 tokens: every condition is cut short, and said so.
    assert "warning: 100% of the baseline answers (4 of 4) stopped at 12 new tokens" in sampled.output
    assert "hint: raise --max-new-tokens" in sampled.output
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["config"]["temperature"], report["config"]["top_p"], report["config"]["seed"]) == (0.7, 0.9, 3)
    assert "sampled at temperature 0.7, top-p 0.9, seed 3" in (run_dir / "report.md").read_text()
    # Sampled records are new records (their own fingerprint), and they are not the greedy answers.
    sampled_files = {p.name for p in (run_dir / "runs").glob("*.jsonl")} - greedy_files
    assert {name.split("-")[0] for name in sampled_files} == {"baseline", "asc"}

    def outputs(names: set[str]) -> dict[str, str]:
        rows = [json.loads(line) for n in names if n.startswith("baseline") for line in (run_dir / "runs" / n).open()]
        return {row["id"]: row["output"] for row in rows}

    assert outputs(sampled_files) != outputs(greedy_files)

    # sweep: the sampled rows are their own points beside the greedy ones, and the frontier uses only its own.
    vector = str(run_dir / "vector_all_layers.safetensors")
    grid = "--layers 1 --strengths 0,0.5 --dataset synthetic --limit 2 --offset 0 --prompt-baselines concise_prompt"
    for extra in ([], SAMPLED):
        swept = runner.invoke(app, ["sweep", *common, "--vector", vector, *grid.split(), *extra])
        assert swept.exit_code == 0, swept.output
    result = json.loads((run_dir / "sweep.json").read_text())
    assert (
        sorted(r["decoding"] for r in result["rows"])
        == ["greedy"] * 3 + ["sampled at temperature 0.7, top-p 0.9, seed 3"] * 3
    )
    (method,) = result["frontier"]["methods"].values()
    sampled_steered = next(r for r in result["rows"] if r["relative_strength"] == 0.5 and r["decoding"] != "greedy")
    # One point: the greedy row of the same grid is not mixed in.
    assert [p["mean_tokens"] for p in method["points"]] == [sampled_steered["mean_tokens"]]

    evaluated = runner.invoke(app, ["eval", *common, "--dataset", "synthetic", "--limit", "2", *SAMPLED])
    assert evaluated.exit_code == 0, evaluated.output
    assert "warning: 100% of the baseline answers (2 of 2) stopped at 12 new tokens" in evaluated.output


def test_compress_refuses_a_nucleus_outside_zero_to_one_before_any_work(tmp_path) -> None:
    result = runner.invoke(app, ["compress", "--top-p", "1.5", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert not any(tmp_path.iterdir())


def test_the_frontier_is_drawn_from_the_rows_of_its_own_decoding_only(tmp_path) -> None:
    from residlab.methods.sweep import frontier_summary

    sampled = SweepConfig(temperature=0.7, top_p=0.9, seed=3, dataset="synthetic", split="train", offset=0)

    def row(decoding: str, strength: float, correct: list[bool], tokens: list[int]) -> dict[str, object]:
        return {
            "dataset": "synthetic", "split": "train", "offset": 0, "n": 2, "decoding": decoding,
            "template": "baseline", "vector": "v.safetensors" if strength else "", "layer": 1 if strength else -1,
            "positions": "generated", "schedule": None, "relative_strength": strength,
            "accuracy": sum(correct) / 2, "mean_tokens": sum(tokens) / 2, "correct": correct, "tokens": tokens,
        }  # fmt: skip

    rows = [
        row("greedy", 0.0, [True, True], [100, 100]),
        row("greedy", 0.5, [True, True], [40, 40]),
        row(sampled.decoding().describe(), 0.0, [True, False], [200, 200]),
        row(sampled.decoding().describe(), 0.5, [False, False], [150, 150]),
    ]
    frontier = frontier_summary(rows, sampled, 2, None, tmp_path / "frontier.png", "t")
    (method,) = frontier["methods"].values()
    assert method["points"] == [{"relative_strength": 0.5, "accuracy": 0.0, "mean_tokens": 150.0}]
    # Legacy rows without a decoding are greedy: the greedy frontier of the same rows sees only those.
    greedy = SweepConfig(dataset="synthetic", split="train", offset=0)
    legacy = [{k: v for k, v in r.items() if k != "decoding"} for r in rows[:2]] + rows[2:]
    (method,) = frontier_summary(legacy, greedy, 2, None, tmp_path / "g.png", "t")["methods"].values()
    assert method["points"] == [{"relative_strength": 0.5, "accuracy": 1.0, "mean_tokens": 40.0}]
