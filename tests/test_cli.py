import json

import pytest
from conftest import random_vector
from typer.testing import CliRunner

from residlab import SteeringVector, load
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--layers", "abc"], "cannot read layers 'abc'"),
        (["generate", "--layers", "20:8"], "select no layer"),
        (["vector", "export", "v.safetensors", "v.gguf", "--layers", "abc"], "cannot read layers 'abc'"),
        (["generate", "--strength", "nan"], "strength 'nan' is not a finite number"),
        (["generate", "--strength", "-inf"], "strength '-inf' is not a finite number"),
        (["generate", "--strength", "strong"], "cannot read strength 'strong'"),
        (["serve", "--strength", "inf"], "not a finite number"),
        (["generate", "--positions", "0,,1"], "unknown position rule"),
        (["serve", "--positions", "sometimes"], "unknown position rule"),
        (["generate", "--dtype", "f8"], "unknown dtype 'f8'"),
        (["info", "--dtype", "half"], "unknown dtype 'half'"),
        (["generate", "--engine", "gpu"], "unknown engine 'gpu'"),
    ],
)
def test_shared_options_reject_bad_values_before_anything_loads(args, message):
    # No prompt and no such model: had the option not been checked while the command line is read,
    # the error would be "no prompt given" or "no model at".
    model = [] if args[0] == "vector" else ["-m", "./missing-model"]
    result = runner.invoke(app, [*args, *model])
    assert result.exit_code == 2, result.output
    error, hint = result.output.strip().splitlines()
    assert error.startswith("error: ") and message in error and hint.startswith("hint: ")
    assert "Traceback" not in result.output and "Invalid value" not in result.output


def test_shared_options_accept_good_values(tiny_dir, tmp_path):
    lm = load(tiny_dir)
    vec_path = random_vector(lm, [0, 1, 2]).save(tmp_path / "v.safetensors")
    args = ["generate", "-m", tiny_dir, "-p", "Natalia sold", "--max-new-tokens", "3", "--vector", str(vec_path)]
    steered = runner.invoke(app, [*args, "--layers", "1:3", "--positions", "0,-1", "--strength", "2.5"])
    assert steered.exit_code == 0, steered.output
    assert "steered (strength 2.5, 0,-1)" in steered.stderr
    exported = runner.invoke(app, ["vector", "export", str(vec_path), str(tmp_path / "v.gguf"), "--layers", "1,2"])
    assert exported.exit_code == 0, exported.output
    assert "layers [1, 2]" in exported.output


def test_serve_gets_parsed_options(tiny_dir, monkeypatch, tmp_path):
    import residlab.serving.server as server_module

    seen = {}

    class FakeServer:
        server_address = ("127.0.0.1", 1234)

        def __init__(self, runner, host, port, *, vector, strength, positions, limits, **serving):
            seen.update(strength=strength, positions=positions, max_new_tokens=limits.max_new_tokens)

        def serve_forever(self):
            pass

        def server_close(self):
            pass

    monkeypatch.setattr(server_module, "ModelServer", FakeServer)
    args = [
        "serve",
        "-m",
        tiny_dir,
        "--port",
        "0",
        "--strength",
        "0.5",
        "--positions",
        "0,-1",
        "--max-tokens-limit",
        "7",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == {"strength": 0.5, "positions": (0, -1), "max_new_tokens": 7}
    default = runner.invoke(app, ["serve", "-m", tiny_dir, "--port", "0"])
    assert default.exit_code == 0, default.output
    assert seen == {"strength": 1.0, "positions": "prompt_last+generated", "max_new_tokens": 2048}
    # Regression: with a vector, the default is the rule the vector records, and the log says so.
    lm = load(tiny_dir)
    vec = random_vector(lm, [1]).save(tmp_path / "v.safetensors")
    from dataclasses import replace

    replace(SteeringVector.load(vec), position_rule="all").save(vec)
    recorded = runner.invoke(app, ["serve", "-m", tiny_dir, "--port", "0", "--vector", str(vec)])
    assert recorded.exit_code == 0, recorded.output
    assert seen["positions"] == "all"
    assert "steered (strength 1.0, all: the vector's recorded rule)" in recorded.stderr
    given = runner.invoke(app, ["serve", "-m", tiny_dir, "--port", "0", "--vector", str(vec), "--positions", "prompt"])
    assert given.exit_code == 0 and seen["positions"] == "prompt"
