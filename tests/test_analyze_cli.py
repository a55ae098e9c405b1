import json

import pytest
from typer.testing import CliRunner

from residlab.cli.main import app
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen", "qwen2"))


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [
        {"question": "Natalia sold clips to 48 of her friends in April. How many clips?", "answer": "#### 72"},
        {"question": "Weng earns $12 an hour for babysitting. How much did she earn?", "answer": "#### 10"},
        {"question": "Solve x + 3 = 10.", "answer": "#### 7"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_analyze_depth(tiny_dir, questions, tmp_path):
    out = tmp_path / "depth"
    result = _run(
        ["analyze", "depth", "-m", tiny_dir, "--text-file", str(questions), "--limit", "2", "--out", str(out)]
    )
    assert "depth usage (2 texts" in result.stdout and "lens KL" in result.stdout
    data = json.loads((out / "depth.json").read_text())
    assert data["num_texts"] == 2 and len(data["skip_effect"]) == 3 == len(data["lens_kl"])
    for name in ("depth_contributions.png", "depth_logit_lens.png", "depth_skip_effect.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_analyze_sparsity(tiny_dir, questions, tmp_path):
    out = tmp_path / "sparsity"
    args = ["analyze", "sparsity", "-m", tiny_dir, "--text-file", str(questions), "--max-search-steps", "3"]
    result = _run([*args, "--cett-targets", "0.2", "--out", str(out)])
    assert "PPL-1% sparsity" in result.stdout and "CETT 0.2" in result.stdout
    data = json.loads((out / "sparsity.json").read_text())
    assert data["activation"] == "silu" and len(data["nonzero_above"]) == 3 and len(data["ppl_search"]) <= 3
    for name in ("sparsity_nonzero.png", "sparsity_cett.png", "sparsity_temporal.png"):
        assert (out / name).exists()


def test_analyze_dims_default_out_dir(tiny_dir, tmp_path, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("Natalia sold clips to 48 of her friends.\n\nHow many clips did she sell in May?\n")
    monkeypatch.chdir(tmp_path)
    result = _run(["analyze", "dims", "-m", tiny_dir, "--text-file", str(texts), "--max-tokens", "8"])
    assert "hidden-dimension concentration" in result.stdout
    out = tmp_path / "residlab-out" / "analyses" / "tiny-qwen" / "dims"
    data = json.loads((out / "dims.json").read_text())
    assert data["num_texts"] == 2 and data["num_tokens"] == 14  # 2 texts x (8 tokens - position 0)
    assert (out / "dims_concentration.png").exists()


def test_analyze_errors_are_one_line_with_a_hint(tiny_dir, tmp_path):
    missing = runner.invoke(app, ["analyze", "depth", "-m", tiny_dir, "--text-file", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "no text file" in missing.output and "hint:" in missing.output
    no_file = runner.invoke(app, ["analyze", "sparsity", "-m", tiny_dir])
    assert no_file.exit_code == 2 and "--text-file" in no_file.output
    bad = runner.invoke(app, ["analyze", "sparsity", "-m", tiny_dir, "--text-file", __file__, "--cett-targets", "x"])
    assert bad.exit_code == 2 and "cett-targets" in bad.output


def test_analyze_shared_options_are_checked_before_any_work(tiny_dir, tmp_path):
    # No text file given: without the dtype check at parse time the error would be "no texts to analyse".
    bad = runner.invoke(app, ["analyze", "dims", "-m", tiny_dir, "--dtype", "half"])
    assert bad.exit_code == 2
    error, hint = bad.output.strip().splitlines()
    assert error == "error: unknown dtype 'half'." and hint.startswith("hint: use auto or one of float32")


def test_analyze_times_and_writes_to_the_out_dir(tiny_dir, questions, tmp_path):
    out = tmp_path / "dims-bf16"
    args = ["analyze", "dims", "-m", tiny_dir, "--text-file", str(questions), "--dtype", "bfloat16"]
    result = _run([*args, "--max-tokens", "4", "--out", str(out)])
    assert "loaded tiny-qwen (3 layers) in" in result.stderr and "; 3 texts" in result.stderr
    assert f"wrote 2 files to {out} in" in result.stdout
    assert json.loads((out / "dims.json").read_text())["num_texts"] == 3
