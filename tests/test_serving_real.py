"""`residlab serve` batching concurrent, differently steered requests on real packaged models.

The torch engine on SmolLM2-135M (continuous batching: every answer equal to the request alone) and
llama.cpp on its GGUF (grouped by vector). Bounded: a few short requests each.
"""

from __future__ import annotations

import os

import pytest

from residlab.engines import SamplingParams, llama_cpp_available, open_engine
from residlab.serving.loadtest import LoadRequest, concurrent, mismatches, one_at_a_time
from residlab.serving.server import ModelServer, serving_in_background
from residlab.serving.steering import SteeringRequest, VectorLibrary

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is 12 times 7?",
    "Name a colour of the sky.",
    "Tom has 3 boxes with 12 apples each. How many apples?",
    "Write one sentence about the sea.",
]


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.delenv("RESIDLAB_CACHE", raising=False)
    if os.environ.get("RESIDLAB_REAL_CACHE"):
        monkeypatch.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])


def french_vector(engine, lm, folder):
    """A real direction: the residual of a French answer minus the same answer in English, at one layer."""
    from residlab import SteeringVector

    layer = lm.num_layers // 2
    texts = [lm.format_prompt("Say hello.") + a for a in ("Bonjour, comment allez-vous ?", "Hello, how are you?")]
    with lm.record(layers=[layer], positions="last") as rec:
        lm.forward(texts, add_special_tokens=False)
    vector = SteeringVector.from_tensor(rec[layer][0] - rec[layer][1], model=lm, layer=layer).normalized()
    vector.save(folder / "french.safetensors")
    return float(rec[layer][1].norm())


def bodies(norm):
    mix = [None, {"vector": "french", "strength": 0.5 * norm}, None, {"vector": "french", "strength": norm}]
    out = []
    for i, question in enumerate(QUESTIONS * 2):
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12}
        if mix[i % 4] is not None:
            body["steering"] = mix[i % 4]
        out.append(body)
    return out


def test_concurrent_steered_requests_on_the_torch_engine(real_cache, tmp_path):
    engine = open_engine(MODEL, "torch", dtype="float32")
    norm = french_vector(engine, engine.lm, tmp_path)
    library = VectorLibrary.from_directory(tmp_path, engine)
    requests = [LoadRequest("/v1/chat/completions", b) for b in bodies(norm)]
    with serving_in_background(ModelServer(engine, "127.0.0.1", 0, vectors=library, max_batch=8)) as server:
        port = server.server_address[1]
        together, _ = concurrent(port, requests, timeout=120)
        solo, _ = one_at_a_time(port, requests[:4], timeout=120)
    assert all(o.ok for o in together), together
    assert mismatches(solo, together[:4]) == []
    for request, outcome in zip(requests[:4], together, strict=False):
        raw = request.body.get("steering")
        resolved = library.resolve(SteeringRequest.model_validate(raw), engine) if raw else None
        alone = engine.generate(
            [request.body["messages"]], SamplingParams(max_new_tokens=12), steering=resolved and resolved.spec()
        )[0]
        assert outcome.text == alone.text
    assert together[1].text != together[0].text and together[3].text != together[1].text


@pytest.mark.llamacpp
def test_llamacpp_engine_groups_requests_by_vector(real_cache, tmp_path):
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (`make install-llamacpp`).")
    torch_engine = open_engine(MODEL, "torch", dtype="float32")
    norm = french_vector(torch_engine, torch_engine.lm, tmp_path)
    with open_engine(MODEL, "llamacpp") as engine:
        library = VectorLibrary.from_directory(tmp_path, engine)
        requests = [LoadRequest("/v1/chat/completions", b) for b in bodies(norm)]
        with serving_in_background(ModelServer(engine, "127.0.0.1", 0, vectors=library)) as server:
            assert server.scheduler.name == "grouped-scheduler"
            together, _ = concurrent(server.server_address[1], requests, timeout=120)
            histogram = server.metrics.snapshot()["batch_size"]["histogram"]
    assert all(o.ok for o in together), together
    assert max(int(size) for size in histogram) > 1  # requests that steer alike shared a batch
    assert len({o.text for o in together[:4]}) > 1
