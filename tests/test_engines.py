"""The engine interface on the torch engine (tiny models), and engine selection."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import PROMPTS, random_vector

from residlab import ModelMismatchError, ResidlabError
from residlab.core.generation import DecodedBatch, PromptBatch, encode_prompts, pick_next_tokens
from residlab.engines import Engine, SamplingParams, SteeringSpec, as_engine, open_engine, resolve_engine
from residlab.engines.torch_engine import TorchEngine


def test_torch_engine_generates_what_the_model_generates(qwen):
    vec = random_vector(qwen, [1])
    spec = SteeringSpec(vec, strength=0.7, positions="prompt_last+generated")
    with open_engine("unused", "torch", lm=qwen) as engine:
        got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), steering=spec, chat=False, batch_size=2)
        plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), chat=False)
        sampled = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=4)
        engine_sampled = engine.generate(PROMPTS, sampled, chat=False, batch_size=2)
    with qwen.steer(vec, strength=0.7, positions="prompt_last+generated"):
        want = qwen.generate(PROMPTS, max_new_tokens=6, chat=False, batch_size=2)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.token_ids for g in plain] != [g.token_ids for g in got]  # the steering did something
    lm_sampled = qwen.generate(PROMPTS, max_new_tokens=6, chat=False, batch_size=2, temperature=1.5, top_p=0.9, seed=4)
    assert [g.token_ids for g in engine_sampled] == [g.token_ids for g in lm_sampled]  # one sampler, one seeding


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


def test_greedy_is_exactly_the_argmax():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    logits[3, [5, 9]] = logits[3].max() + 1  # a tie: the first index wins, as with argmax
    greedy = SamplingParams()
    assert torch.equal(pick_next_tokens(logits, greedy, None), logits.argmax(dim=-1))
    assert int(pick_next_tokens(logits, greedy, None)[3]) == 5
    half = logits.bfloat16()
    assert torch.equal(pick_next_tokens(half.float(), greedy, None), half.argmax(dim=-1))


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])

    def draw(params: SamplingParams, seed: int) -> int:
        return int(pick_next_tokens(logits, params, torch.Generator().manual_seed(seed))[0])

    assert draw(SamplingParams(temperature=1.0, top_p=1e-6), 0) == 1  # a nucleus of one token
    hot = SamplingParams(temperature=5.0)
    assert [draw(hot, 7) for _ in range(5)] == [draw(hot, 7)] * 5  # seeded: reproducible
    assert len({draw(hot, i) for i in range(50)}) > 2  # a high temperature really samples
    nucleus = SamplingParams(temperature=5.0, top_p=0.5)  # 0.5 of the mass: tokens 1 and 3 only
    assert {draw(nucleus, i) for i in range(50)} == {1, 3}
    first, second = SamplingParams(seed=3).generator(), SamplingParams(seed=3).generator()
    assert torch.equal(torch.rand(4, generator=first), torch.rand(4, generator=second))
    assert SamplingParams().generator() is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "at least 1"),
        ("max_new_tokens", 2.5, "whole number"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), "finite"),
        ("top_p", 0.0, r"\(0, 1\]"),
        ("top_p", 1.5, r"\(0, 1\]"),
        ("top_p", float("inf"), "finite"),
        ("seed", -1, r"\[0, 2\*\*64\)"),
        ("seed", "7", "whole number"),
        ("ignore_eos", 1, "True or False"),
    ],
)
def test_sampling_params_are_checked(field, value, message):
    with pytest.raises(ResidlabError, match=f"{field} must .*{message}") as err:
        SamplingParams(**{field: value})
    assert err.value.hint or field == "ignore_eos"


def test_sampling_params_hold_plain_numbers():
    params = SamplingParams(max_new_tokens=np.int64(5), temperature=1, top_p=np.float32(0.5), seed=np.uint32(9))
    assert params == SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.5, seed=9)
    assert type(params.max_new_tokens) is int and type(params.temperature) is float and type(params.seed) is int
    with pytest.raises(AttributeError):
        params.seed = 3  # type: ignore[misc]


class _BosTokenizer:
    """The tiny tokenizer, but marking plain text with a BOS id (0) as Llama's tokenizer does."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.chat_template = inner.chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.inner.apply_chat_template(messages, **kwargs)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": [0] * add_special_tokens + ids}


def test_prompts_are_encoded_once_for_every_engine(qwen):
    tok = _BosTokenizer(qwen.tokenizer)
    single = encode_prompts(tok, PROMPTS[0], chat=False)  # one prompt, not a list: still one row
    assert single.texts == (PROMPTS[0],) and single.token_ids == (tuple(tok(PROMPTS[0])["input_ids"]),)
    assert single.token_ids[0][0] == 0  # plain text gets the tokenizer's BOS
    chat = [{"role": "user", "content": "Hi"}]
    both = encode_prompts(tok, [chat, "Hi"], system="Be brief.")  # chat by default: there is a template
    assert both.texts[0] == both.texts[1] and "Be brief." in both.texts[0]
    assert both.token_ids[0] == tuple(tok(both.texts[0], add_special_tokens=False)["input_ids"])  # no BOS added
    one_chat = encode_prompts(tok, chat, system="Be brief.")  # one chat (a list of messages): still one row
    assert one_chat.token_ids == both.token_ids[:1] != encode_prompts(tok, chat).token_ids
    with pytest.raises(ResidlabError, match="prompt 1 tokenised to nothing"):
        encode_prompts(qwen.tokenizer, ["Hi", ""], chat=False)
    with pytest.raises(ModelMismatchError, match="beyond tiny's vocabulary of 5"):
        encode_prompts(tok, ["Hi"], chat=False, model_name="tiny", vocab_size=5)


class _Recorder(Engine):
    """An engine whose decoder records what the shared base hands it and echoes the prompt back."""

    kind = "recorder"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, "recorder")
        self.batches: list[PromptBatch] = []
        self.generators: list[object] = []
        self.closed = False

    num_layers = hidden_size = 0  # type: ignore[assignment]
    identity = "recorder"  # type: ignore[assignment]

    def _steered(self, steering):
        import contextlib

        def decode(batch, sampling, generator):
            self.batches.append(batch)
            self.generators.append(generator)
            return DecodedBatch(
                [list(ids[: sampling.max_new_tokens]) for ids in batch.token_ids], [True] * len(batch.rows)
            )

        return contextlib.nullcontext(decode)

    def score(self, token_ids, steering=None):
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def test_the_engine_base_sorts_batches_seeds_once_and_restores_the_order(qwen):
    prompts = ["a b c d e f", "a", "a b c", "a b"]
    with _Recorder(qwen.tokenizer) as engine:
        out = engine.generate(prompts, SamplingParams(max_new_tokens=50, seed=1), chat=False, batch_size=3)
    assert engine.closed
    assert [b.rows for b in engine.batches] == [(1, 3, 2), (0,)]  # shortest first
    assert engine.batches[0].token_ids[0] == tuple(qwen.tokenizer("a")["input_ids"])
    assert engine.generators[0] is engine.generators[1] is not None  # one seeded generator per call
    assert [g.text for g in out] == prompts and all(g.hit_limit for g in out)
    assert [g.batch_size for g in out] == [1, 3, 3, 3]
    with pytest.raises(RuntimeError, match="boom"), _Recorder(qwen.tokenizer) as failing:
        raise RuntimeError("boom")
    assert failing.closed  # closed on the way out of an exception too


def test_server_answers_bad_sampling_with_a_4xx(qwen):
    import json
    import urllib.error
    import urllib.request

    from residlab.serving.server import ModelServer, serving_in_background

    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0)) as server:
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}).encode()
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30)
    assert info.value.code == 422  # refused by the request schema, before any sampling
    assert "temperature" in json.loads(info.value.read())["error"]["message"]


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
