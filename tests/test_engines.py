"""The engine interface on the torch engine (tiny models), and engine selection."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import PROMPTS, random_vector

from residlab import ResidlabError
from residlab.engines import SteeringSpec, as_engine, open_engine, resolve_engine
from residlab.engines.base import sample_next
from residlab.engines.torch_engine import TorchEngine


def test_torch_engine_generates_what_the_model_generates(qwen):
    engine = open_engine("unused", "torch", lm=qwen)
    vec = random_vector(qwen, [1])
    spec = SteeringSpec(vec, strength=0.7, positions="prompt_last+generated")
    got = engine.generate(PROMPTS, steering=spec, max_new_tokens=6, chat=False, batch_size=2)
    with qwen.steer(vec, strength=0.7, positions="prompt_last+generated"):
        want = qwen.generate(PROMPTS, max_new_tokens=6, chat=False, batch_size=2)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    plain = engine.generate(PROMPTS, max_new_tokens=6, chat=False)
    assert [g.token_ids for g in plain] != [g.token_ids for g in got]  # the steering did something


def test_torch_engine_score_is_the_forward_pass(qwen):
    engine = as_engine(qwen)
    assert isinstance(engine, TorchEngine) and engine.identity == "torch:float32"
    ids = engine.tokenize(PROMPTS[0])
    logits = engine.score(ids)
    want = qwen.forward([PROMPTS[0]], add_special_tokens=False)[0].numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    vec = random_vector(qwen, [1])
    steered = engine.score(ids, SteeringSpec(vec, 1.0))
    with qwen.steer(vec, positions="all"):
        want = qwen.forward([PROMPTS[0]], add_special_tokens=False)[0].numpy()
    np.testing.assert_allclose(steered, want, rtol=1e-5, atol=1e-5)


def test_steering_spec_scales_and_checks_layers(qwen):
    vec = random_vector(qwen, [0, 2])
    deltas = SteeringSpec(vec, strength=2.0, layers=(2,)).deltas()
    assert list(deltas) == [2]
    np.testing.assert_allclose(deltas[2], vec.directions[2].numpy() * 2.0, rtol=1e-6)
    with pytest.raises(ResidlabError, match=r"no direction for layer\(s\) \[1\]"):
        SteeringSpec(vec, layers=(1,)).deltas()


def test_sampling_rules():
    logits = np.array([0.0, 3.0, 1.0, 2.9], dtype=np.float32)
    assert sample_next(logits, 0.0, 1.0, None) == 1
    assert sample_next(logits, 1.0, 1e-6, np.random.default_rng(0)) == 1  # nucleus of one token
    a = [sample_next(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(5)]
    b = [sample_next(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(5)]
    assert a == b
    draws = {sample_next(logits, 5.0, 1.0, np.random.default_rng(i)) for i in range(50)}
    assert len(draws) > 2  # a high temperature really samples


def test_engine_choice(tmp_path, monkeypatch):
    from residlab.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", "qwen2")
    assert resolve_engine(str(model_dir), "auto") == "torch"  # not a GGUF: llama.cpp cannot run it
    with pytest.raises(ResidlabError, match="unknown engine"):
        resolve_engine(str(model_dir), "vllm")
    with pytest.raises(ResidlabError, match="needs a GGUF"):
        from residlab.models.loading import load_gguf

        load_gguf(str(model_dir))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert resolve_engine("qwen2.5-coder-0.5b-instruct", "auto") == "torch"
    with pytest.raises(ResidlabError, match="llama-cpp-python") as err:
        open_engine("qwen2.5-coder-0.5b-instruct", "llamacpp")
    assert "make install-llamacpp" in err.value.hint


def test_records_are_kept_apart_per_engine(qwen, tmp_path):
    from residlab.evaluation.runner import Condition, Decoding, records_path

    class Other(TorchEngine):
        @property
        def identity(self) -> str:
            return "llamacpp:model.gguf:123"

    condition, decoding = Condition("baseline"), Decoding()
    assert records_path(tmp_path, condition, decoding, qwen) != records_path(tmp_path, condition, decoding, Other(qwen))
    assert records_path(tmp_path, condition, decoding, qwen) == records_path(
        tmp_path, condition, decoding, TorchEngine(qwen)
    )


def test_generate_cli_runs_on_the_torch_engine_with_a_gguf_vector(qwen, tmp_path):
    from typer.testing import CliRunner

    from residlab.cli.main import app
    from residlab.testing import save_tiny_model
    from residlab.vectors.gguf_control import export_control_vector

    model_dir = save_tiny_model(tmp_path / "tiny", "qwen2")
    vec = random_vector(qwen, [1])
    path = export_control_vector(type(vec)(**{**vec.__dict__, "model_name": "tiny"}), tmp_path / "v.gguf", scale=1.0)
    args = ["generate", "-m", str(model_dir), "-p", "hello", "--max-new-tokens", "3", "--no-chat", "--json"]
    out = CliRunner().invoke(app, [*args, "--vector", str(path), "--engine", "auto"])
    assert out.exit_code == 0, out.output
    assert "torch engine" in out.output and '"num_tokens": 3' in out.output


def test_auto_dtype_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    import torch

    from residlab.models import loading

    assert loading.parse_dtype(None) == torch.float32  # analyses stay exact by default
    monkeypatch.setattr(loading, "bf16_is_fast", lambda: True)
    assert loading.parse_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(loading, "bf16_is_fast", lambda: False)
    assert loading.parse_dtype("auto") == torch.float32
    with pytest.raises(ResidlabError, match="unknown dtype"):
        loading.parse_dtype("int3")
