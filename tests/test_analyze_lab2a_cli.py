"""``residlab analyze cka | guidance | residual | criticality`` on a tiny model, and once each on a real one."""

import json
import os

import pytest
from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "220"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen", "qwen2"))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama", seed=1))


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text(
        "The river flows north through the valley, past three old mills and a stone bridge.\n"
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.\n"
        "A prime number has exactly two divisors: one and itself.\n"
    )
    return path


def _run(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_cka_within_and_between(tiny_dir, other_dir, texts, tmp_path):
    out = tmp_path / "cka"
    result = _run(["analyze", "cka", "-m", tiny_dir, "--text-file", str(texts), "--minibatch", "8", "--out", str(out)])
    assert "linear CKA" in result.stdout and "off-diagonal mean" in result.stdout
    data = json.loads((out / "cka.json").read_text())
    assert data["unit"] == "token" and data["biased"][0][0] == pytest.approx(1.0)
    out2 = tmp_path / "cka2"
    _run(["analyze", "cka", "-m", tiny_dir, "--other", other_dir, "--text-file", str(texts), "--minibatch", "8",
          "--out", str(out2)])  # fmt: skip
    assert json.loads((out2 / "cka.json").read_text())["unit"] == "word"


def test_residual_and_criticality(tiny_dir, texts, tmp_path):
    result = _run(["analyze", "residual", "-m", tiny_dir, "--text-file", str(texts), "--alphas", "0,1",
                   "--range-alphas", "0.5", "--out", str(tmp_path / "r")])  # fmt: skip
    assert "CE vs alpha, all" in result.stdout and "GPT-2 XL" in result.stdout
    assert (tmp_path / "r" / "residual_alpha_sweep.png").is_file()
    result = _run(["analyze", "criticality", "-m", tiny_dir, "--text-file", str(texts), "--out", str(tmp_path / "c")])
    assert "fresh init" in result.stdout and (tmp_path / "c" / "criticality.png").is_file()


def test_guidance_command(tiny_dir, tmp_path):
    args = ["analyze", "guidance", "--guide", tiny_dir, "--steps", "2", "--seeds", "0", "--layers", "2", "--width", "8",
            "--vocab", "30", "--seq-len", "8", "--train-windows", "6", "--eval-windows", "2", "--batch-size", "2",
            "--eval-every", "1", "--work-dir", str(tmp_path / "g")]  # fmt: skip
    result = _run(args)
    assert "guided - baseline" in result.stdout
    assert (tmp_path / "g" / "result" / "guidance.json").is_file()


def test_bad_values_are_one_line_errors(tiny_dir, texts):
    result = runner.invoke(app, ["analyze", "residual", "-m", tiny_dir, "--text-file", str(texts), "--alphas", "x"])
    assert result.exit_code == 2 and "hint:" in result.output
    result = runner.invoke(app, ["analyze", "guidance", "--guide", tiny_dir, "--conditions", "teacher"])
    assert result.exit_code == 2 and "condition" in result.output


# --------------------------------------------------------------------------------------------- real models


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.delenv("RESIDLAB_CACHE", raising=False)
    if os.environ.get("RESIDLAB_REAL_CACHE"):
        monkeypatch.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])


@pytest.mark.real_model
def test_real_cka_neighbouring_layers_are_most_alike(real_cache, tmp_path):
    out = tmp_path / "cka"
    _run(["analyze", "cka", "--limit", "3", "--max-tokens", "48", "--minibatch", "32", "--out", str(out)])
    data = json.loads((out / "cka.json").read_text())
    s = data["summary"]
    assert data["layers_a"] == 24 and data["debiased"][5][5] == pytest.approx(1.0)
    assert s["adjacent_mean_debiased"] > s["off_diagonal_mean_debiased"] > 0
    assert s["first_last_debiased"] < s["adjacent_mean_debiased"]


@pytest.mark.real_model
def test_real_guidance_with_smollm2_as_guide(real_cache, tmp_path):
    args = ["analyze", "guidance", "--steps", "6", "--seeds", "0", "--train-windows", "12", "--eval-windows", "4",
            "--seq-len", "24", "--batch-size", "4", "--eval-every", "3", "--work-dir", str(tmp_path / "g")]  # fmt: skip
    _run(args)
    data = json.loads((tmp_path / "g" / "result" / "guidance.json").read_text())
    assert data["guide_layers"] == [9, 19, 29]
    guided = next(r for r in data["runs"] if r["condition"] == "guided")
    assert guided["guidance_loss"][-1] < 3  # 3 layers of (1 - CKA)


@pytest.mark.real_model
def test_real_residual_branches_matter_and_norms_grow(real_cache, tmp_path):
    out = tmp_path / "r"
    _run(["analyze", "residual", "--limit", "2", "--max-tokens", "48", "--alphas", "0,0.3,1", "--range-alphas", "",
          "--out", str(out)])  # fmt: skip
    data = json.loads((out / "residual.json").read_text())
    ce = dict(zip(data["sweeps"][0]["alphas"], data["sweeps"][0]["ce"], strict=True))
    assert ce[0.0] > ce[0.3] > ce[1.0] and 1.5 < ce[1.0] < 5
    assert data["summary"]["fitted_growth_per_layer"] > 1.0


@pytest.mark.real_model
def test_real_criticality_trained_vs_fresh(real_cache, tmp_path):
    out = tmp_path / "c"
    _run(["analyze", "criticality", "-m", "smollm2-135m-instruct", "--limit", "2", "--max-tokens", "48",
          "--out", str(out)])  # fmt: skip
    data = json.loads((out / "criticality.json").read_text())
    trained, fresh = data["trained"], data["fresh"]
    # the GGUF that ships the model records no initializer_range: transformers' default 0.02 is used
    assert len(trained["growth"]) == 30 and data["initializer_range"] == pytest.approx(0.02)
    # a trained network's residual grows far more over depth than the freshly initialised one's
    assert (
        trained["residual_rms"][-1] / trained["residual_rms"][0] > fresh["residual_rms"][-1] / fresh["residual_rms"][0]
    )
