"""Fuzz the CLI's numeric and enumerated options: every input gives a clear error (error: + hint:,
exit 2) or a valid result (exit 0, finite numbers); never a traceback, never NaN in the output."""

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from residlab import SteeringVector
from residlab.cli.main import app
from residlab.testing import save_tiny_model, tiny_model

runner = CliRunner(env={"COLUMNS": "200"})
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

garbage = st.sampled_from(["", "abc", "nan", "inf", "-inf", "1e999", "0x10", "1,2", " ", "--", "None", "½"])
small_ints = st.integers(min_value=-3, max_value=3).map(str)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr)
number_like = st.one_of(garbage, small_ints, floats)
rules = st.one_of(
    st.sampled_from(["all", "prompt", "generated", "prompt_last+generated", "sometimes", "0", "-1", "0,-1", "999"]),
    garbage,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = save_tiny_model(root / "tiny")
    lm = tiny_model("qwen2")
    vector = SteeringVector.from_tensor(torch.ones(lm.hidden_size), model=lm, layer=1).save(root / "v.safetensors")
    return root, str(model), str(vector)


def check(result) -> None:
    output = result.output
    assert "Traceback" not in output and "unexpected" not in output, output
    assert result.exit_code in (0, 2), output
    if result.exit_code == 2:
        assert "error:" in output and "hint:" in output, output
    else:
        assert not re.search(r"\bnan\b", output, re.IGNORECASE), output


@FUZZ
@given(
    max_new_tokens=st.one_of(garbage, st.integers(min_value=-2, max_value=3).map(str)),
    batch_size=st.one_of(garbage, st.integers(min_value=-2, max_value=3).map(str)),
    limit=st.one_of(garbage, st.integers(min_value=-2, max_value=2).map(str)),
    temperature=number_like,
    strength=number_like,
    positions=rules,
    template=st.sampled_from(["baseline", "concise_prompt", "fancy", ""]),
)
def test_eval_options(setup, max_new_tokens, batch_size, limit, temperature, strength, positions, template):
    root, model, vector = setup
    args = ["eval", "--model", model, "--dtype", "float32", "--dataset", "synthetic", "--work-dir", str(root / "out"),
            "--vector", vector, "--allow-other-model", "--max-new-tokens", max_new_tokens, "--batch-size", batch_size,
            "--limit", limit, "--temperature", temperature, "--strength", strength, "--positions", positions,
            "--template", template]  # fmt: skip
    check(runner.invoke(app, args))


@FUZZ
@given(
    strength=number_like,
    positions=rules,
    layers=st.one_of(garbage, st.sampled_from(["1", "0", "5", "1:2", "0:3:0", "-1", "1,1"])),
    top_p=number_like,
    seed=st.one_of(garbage, st.integers(min_value=-2, max_value=2**70).map(str)),
    engine=st.sampled_from(["auto", "torch", "llamacpp", "vllm", ""]),
    dtype=st.sampled_from(["auto", "float32", "bfloat16", "float8", ""]),
)
def test_generate_options(setup, strength, positions, layers, top_p, seed, engine, dtype):
    root, model, vector = setup
    args = ["generate", "--model", model, "-p", "Natalia sold clips", "--max-new-tokens", "2", "--vector", vector,
            "--allow-other-model", "--strength", strength, "--positions", positions, "--layers", layers,
            "--top-p", top_p, "--seed", seed, "--engine", engine, "--dtype", dtype]  # fmt: skip
    check(runner.invoke(app, args))


@FUZZ
@given(scale=number_like, layers=st.one_of(garbage, st.sampled_from(["1", "0", "2", "1:3"])))
def test_vector_export_options(setup, scale, layers):
    root, _, vector = setup
    target = root / "fuzz.gguf"
    result = runner.invoke(
        app, ["vector", "export", vector, str(target), "--scale", scale, "--layers", layers, "--force"]
    )
    check(result)
