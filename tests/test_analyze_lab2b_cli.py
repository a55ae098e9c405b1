"""`residlab analyze codes | activations | rsparse` on a tiny model, and once each on the default model."""

import json
import os

import pytest
from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "200"})
SMALL = ["--train-texts", "3", "--max-tokens", "16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen", "qwen2"))


def _run(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_analyze_codes_cli(tiny_dir, tmp_path):
    out = tmp_path / "codes"
    result = _run(
        ["analyze", "codes", "-m", tiny_dir, *SMALL, "--test-texts", "2", "--layers", "0,2", "--out", str(out)]
    )
    assert "MLP sign codes" in result.stdout and "kNN next" in result.stdout
    data = json.loads((out / "codes.json").read_text())
    assert data["layers"] == [0, 2] and data["k"] == 9 and len(data["knn"]["next"]) == 2
    assert (out / "codes_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_activations_cli(tiny_dir, tmp_path):
    out = tmp_path / "act"
    args = ["analyze", "activations", "-m", tiny_dir, *SMALL, "--eval-texts", "2", "--activations", "relu,torch:tanh"]
    result = _run([*args, "--layers", "1:3", "--out", str(out)])
    assert "activation swaps at 2 layers" in result.stdout and "tanh" in result.stdout
    data = json.loads((out / "activations.json").read_text())
    assert [s["name"] for s in data["swaps"]] == ["relu", "tanh"] and data["train_texts"] == 3
    assert (out / "activations_stats.png").exists()


def test_analyze_rsparse_cli(tiny_dir, tmp_path):
    out = tmp_path / "rs"
    args = ["analyze", "rsparse", "-m", tiny_dir, *SMALL, "--eval-texts", "2", "--search-tokens", "16", "--no-speed"]
    result = _run([*args, "--sparsity", "0.4", "--out", str(out)])
    assert "R-Sparse at 40% sparsity" in result.stdout and "cett_down" in result.stdout
    data = json.loads((out / "rsparse.json").read_text())
    assert data["sparsity"] == 0.4 and data["speed"] == [] and not (out / "rsparse_speed.png").exists()


def test_lab2b_errors_are_one_line_with_a_hint(tiny_dir, tmp_path):
    bad = runner.invoke(
        app, ["analyze", "activations", "-m", tiny_dir, "--activations", "swishy", "--out", str(tmp_path)]
    )
    assert bad.exit_code != 0 and "unknown activation 'swishy'" in bad.output and "hint:" in bad.output
    bad = runner.invoke(app, ["analyze", "activations", "-m", tiny_dir, "--activations", "nowhere:fn"])
    assert bad.exit_code != 0 and "cannot import" in bad.output
    bad = runner.invoke(app, ["analyze", "codes", "-m", tiny_dir, "--corpus", "no-such-corpus"])
    assert bad.exit_code != 0 and "unknown corpus" in bad.output and "hint:" in bad.output


# ------------------------------------------------------------------------------------------ real model


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.delenv("RESIDLAB_CACHE", raising=False)
    if os.environ.get("RESIDLAB_REAL_CACHE"):
        monkeypatch.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])


@pytest.mark.real_model
def test_codes_on_the_default_model(real_cache, tmp_path):
    """Early-layer codes identify the current token far above the random-code baseline."""
    args = ["analyze", "codes", "--train-texts", "12", "--test-texts", "4", "--max-tokens", "32", "--layers", "1"]
    _run([*args, "--top-classes", "16", "--max-iter", "30", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "codes.json").read_text())
    assert data["bits"] == 4864 and data["redundancy"][0] < 0.05
    assert data["knn"]["current"][0] > data["random_knn"]["current"][0] + 0.3


@pytest.mark.real_model
def test_activations_on_the_default_model(real_cache, tmp_path):
    """SiLU is the model's own: swapping it in changes nothing; ReLU everywhere hurts."""
    args = ["analyze", "activations", "--activations", "silu,relu", "--no-calibrate", "--eval-texts", "2"]
    _run([*args, "--max-tokens", "48", "--out", str(tmp_path)])
    swaps = {s["name"]: s for s in json.loads((tmp_path / "activations.json").read_text())["swaps"]}
    assert abs(swaps["silu"]["delta_ce"]) < 1e-4 and swaps["relu"]["delta_ce"] > 0.05


@pytest.mark.real_model
def test_rsparse_on_the_default_model(real_cache, tmp_path):
    """One layer at 50%: a real loss, the budget kept, the CETT comparison present."""
    args = ["analyze", "rsparse", "--layers", "12", "--train-texts", "2", "--eval-texts", "2", "--max-tokens", "48"]
    _run([*args, "--search-tokens", "32", "--no-speed", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "rsparse.json").read_text())
    variants = {v["name"]: v for v in data["variants"]}
    assert abs(variants["searched"]["macs_kept"] - 0.5) < 0.01 and variants["cett_down"]["extra"]["mean_cett"] > 0
    assert variants["searched"]["ppl_increase_percent"] <= variants["lowrank"]["ppl_increase_percent"]
