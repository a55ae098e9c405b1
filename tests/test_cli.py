import json

import pytest
from conftest import random_vector
from typer.testing import CliRunner

from residlab import load
from residlab.cli.main import app
from residlab.testing import save_tiny_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen", "qwen2"))


def test_models_lists_packaged_models():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma-3-270m"):
        assert name in result.output
    assert "not fetched" in result.output


def test_info(tiny_dir):
    result = runner.invoke(app, ["info", "--model", tiny_dir])
    assert result.exit_code == 0, result.output
    assert "qwen2" in result.output and "hidden size" in result.output


def test_generate_plain_and_steered(tiny_dir, tmp_path):
    plain = runner.invoke(app, ["generate", "-m", tiny_dir, "-p", "Natalia sold", "--max-new-tokens", "5", "--json"])
    assert plain.exit_code == 0, plain.output
    record = json.loads(plain.stdout.strip().splitlines()[0])
    assert record["num_tokens"] >= 1
    lm = load(tiny_dir)
    vec_path = random_vector(lm, [1], scale=5.0).save(tmp_path / "v.safetensors")
    steered = runner.invoke(
        app,
        [
            "generate",
            "-m",
            tiny_dir,
            "-p",
            "Natalia sold",
            "--max-new-tokens",
            "5",
            "--json",
            "--vector",
            str(vec_path),
            "--strength",
            "1.0",
            "--positions",
            "all",
        ],
    )
    assert steered.exit_code == 0, steered.output
    assert json.loads(steered.stdout.strip().splitlines()[0])["text"] != record["text"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-m", "./missing-model", "-p", "x"], "no model at"),
        (["generate", "-m", "{tiny}"], "no prompt given"),
        (["generate", "-m", "{tiny}", "-p", "x", "--vector", "nope.safetensors"], "no steering vector file"),
        (["generate", "-m", "{tiny}", "-p", "x", "--positions", "sometimes"], "unknown position rule"),
        (["info", "-m", "/no/such.gguf"], "no GGUF file"),
    ],
)
def test_errors_are_one_line_plus_hint(tiny_dir, args, message):
    result = runner.invoke(app, [a.replace("{tiny}", tiny_dir) for a in args])
    assert result.exit_code == 2
    assert message in result.output
    assert "hint:" in result.output
    assert "Traceback" not in result.output


def test_vector_for_another_model(tiny_dir, tmp_path):
    from residlab.testing import tiny_model

    other = tiny_model("llama", hidden=32)
    path = random_vector(other, [1]).save(tmp_path / "other.safetensors")
    result = runner.invoke(app, ["generate", "-m", tiny_dir, "-p", "x", "--vector", str(path)])
    assert result.exit_code == 2 and "was made for tiny-llama" in result.output
