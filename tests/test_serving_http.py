"""The batching server over HTTP on loopback: per-request steering, streaming, bad requests, metrics, load."""

import http.client
import json
import socket
import time

import pytest
from conftest import random_vector

from residlab import ResidlabError
from residlab.engines import SamplingParams, as_engine
from residlab.serving.loadtest import LoadRequest, concurrent, mismatches, one_at_a_time, send
from residlab.serving.schema import ServerLimits
from residlab.serving.server import ModelServer, serving_in_background
from residlab.serving.steering import SteeringRequest, VectorLibrary

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Natalia sold clips"}]


@pytest.fixture
def vectors_dir(qwen, tmp_path):
    folder = tmp_path / "vectors"
    folder.mkdir()
    random_vector(qwen, [0, 1], seed=1).save(folder / "alpha.safetensors")
    random_vector(qwen, [1, 2], seed=2).save(folder / "beta.safetensors")
    (folder / "notes.txt").write_text("not a vector")
    return folder


@pytest.fixture
def server(qwen, vectors_dir):
    library = VectorLibrary.from_directory(vectors_dir, qwen)
    limits = ServerLimits(max_body_bytes=64 * 1024, max_prompt_tokens=200, max_new_tokens=32)
    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0, limits=limits, vectors=library, max_batch=8)) as s:
        yield s


def expected_text(qwen, library, body, chat=True):
    """What the engine alone generates for a request body (greedy)."""
    raw = body.get("steering")
    resolved = library.resolve(SteeringRequest.model_validate(raw), qwen) if raw else None
    prompt = body["messages"] if chat else body["prompt"]
    sampling = SamplingParams(max_new_tokens=body["max_tokens"])
    spec = resolved.spec() if resolved is not None else None
    return as_engine(qwen).generate([prompt], sampling, steering=spec, chat=chat)[0].text


def test_steered_requests_get_what_the_engine_gives_alone(server, qwen):
    port = server.server_address[1]
    plain = {"messages": MESSAGES, "max_tokens": 6}
    steered = {**plain, "steering": {"vector": "alpha", "strength": 4.0}}
    both = {**plain, "steering": {"vectors": [{"name": "alpha", "strength": 2}, {"name": "beta", "strength": -3}]}}
    indexed = {**plain, "steering": {"vector": "beta", "strength": 5, "layers": [2], "positions": [0, -1]}}
    outcomes = [send(port, LoadRequest(CHAT, body)) for body in (plain, steered, both, indexed)]
    assert all(o.ok for o in outcomes), outcomes
    texts = [o.text for o in outcomes]
    assert len(set(texts)) > 1  # steering changed something
    for body, text in zip((plain, steered, both, indexed), texts, strict=True):
        assert text == expected_text(qwen, server.vectors, body)


def test_stream_chunks_concatenate_to_the_whole_text(server):
    port = server.server_address[1]
    for path, body in (
        (CHAT, {"messages": MESSAGES, "max_tokens": 12, "steering": {"vector": "beta", "strength": 2.5}}),
        ("/v1/completions", {"prompt": "How many clips", "max_tokens": 12}),
    ):
        whole = send(port, LoadRequest(path, body))
        streamed = send(port, LoadRequest(path, {**body, "stream": True}))
        assert whole.ok and streamed.ok, (whole, streamed)
        assert streamed.text == whole.text and streamed.chunks >= 2


def test_stream_is_openai_chunk_format(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("POST", CHAT, body=json.dumps({"messages": MESSAGES, "max_tokens": 3, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = [line.decode().strip() for line in response if line.strip()]
    conn.close()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_endpoint(server, qwen):
    body = {"prompt": "How many clips", "max_tokens": 5}
    outcome = send(server.server_address[1], LoadRequest("/v1/completions", body))
    assert outcome.ok and outcome.text == expected_text(qwen, server.vectors, body, chat=False)


@pytest.mark.parametrize(
    ("steering", "status", "message"),
    [
        ({"vector": "../alpha"}, 400, "never paths"),
        ({"vector": "/etc/passwd"}, 400, "never paths"),
        ({"vector": "alpha.safetensors/.."}, 400, "never paths"),
        ({"vector": "gamma"}, 400, "no vector named 'gamma'"),
        ({"vector": "notes"}, 400, "no vector named"),
        ({"vector": "alpha", "strenght": 2}, 422, "strenght"),
        ({"vector": "alpha", "vectors": [{"name": "beta"}]}, 422, "either"),
        ({}, 422, "either"),
        ({"vectors": []}, 422, "vectors"),
        ({"vectors": [{"name": "alpha", "strength": 1}], "strength": 2}, 422, "own strength"),
        ({"vector": "alpha", "strength": "lots"}, 422, "strength"),
        ({"vector": "alpha", "layers": [7]}, 400, "outside"),
        ({"vector": "alpha", "layers": [2]}, 400, "no direction for layer"),
        ({"vector": "alpha", "positions": "sometimes"}, 400, "unknown position rule"),
        ({"vector": "alpha", "positions": [500]}, 400, "outside the prompt"),
        ("alpha", 422, "steering"),
    ],
)
def test_bad_steering_gets_a_4xx_and_the_server_goes_on(server, steering, status, message):
    port = server.server_address[1]
    outcome = send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 2, "steering": steering}))
    assert outcome.status == status, outcome
    assert message in outcome.error
    assert send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 2})).ok


def test_nan_strength_is_refused(server):
    raw = b'{"messages": [{"role": "user", "content": "x"}], "steering": {"vector": "alpha", "strength": NaN}}'
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("POST", CHAT, body=raw)
    response = conn.getresponse()
    assert response.status == 422 and "strength" in json.loads(response.read())["error"]["message"]
    conn.close()


def test_load_of_concurrent_clients_with_mixed_vectors(server, qwen):
    """The fast version of benchmarks/serve_load.py: 16 clients, zero errors, every answer as alone."""
    port = server.server_address[1]
    mix = [None, {"vector": "alpha", "strength": 3.0}, {"vector": "alpha", "strength": -2.0}, {"vector": "beta"}]
    prompts = ["Natalia sold clips", "How many?", "Weng earns $12 an hour", "The answer is 72"]
    requests = []
    for i in range(16):
        body = {"messages": [{"role": "user", "content": prompts[i % 4]}], "max_tokens": 3 + i % 6}
        if mix[i % 4 - i // 4 % 2] is not None:
            body["steering"] = mix[i % 4 - i // 4 % 2]
        requests.append(LoadRequest(CHAT, {**body, "stream": i % 5 == 4}))
    solo, _ = one_at_a_time(port, [LoadRequest(r.path, {**r.body, "stream": False}) for r in requests], timeout=60)
    together, _ = concurrent(port, requests, timeout=60)
    assert [o.error for o in together if not o.ok] == []
    assert mismatches(solo, together) == []
    for request, outcome in zip(requests[:4], solo, strict=False):
        assert outcome.text == expected_text(qwen, server.vectors, request.body)
    metrics = _metrics_when(port, lambda m: m["in_flight"] == 0)  # a handler counts itself out after replying
    assert metrics["responses_by_status"]["200"] >= 32 and metrics["in_flight"] == 0
    assert metrics["batch_size"]["mean"] > 1 and metrics["tokens_generated"] > 0
    assert metrics["latency_s"]["p50"] > 0


def test_health_metrics_and_vectors_routes(server):
    port = server.server_address[1]
    health = json.loads(_get(port, "/health"))
    assert health["status"] == "ok" and health["scheduler"] == "continuous-batcher"
    assert health["vectors"] == ["alpha", "beta"]
    assert [v["id"] for v in json.loads(_get(port, "/v1/vectors"))["data"]] == ["alpha", "beta"]
    before = json.loads(_get(port, "/metrics"))
    send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 2, "steering": {"vector": "x/y"}}))
    was = before["responses_by_status"].get("400", 0)
    after = _metrics_when(port, lambda m: m["responses_by_status"].get("400", 0) > was)
    assert after["responses_by_status"]["400"] == was + 1


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    port = server.server_address[1]
    body = json.dumps({"messages": MESSAGES, "max_tokens": 32, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        client.sendall(head + body)
        assert client.recv(64).startswith(b"HTTP/1.1 200")  # streaming has begun; hang up
    assert send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 2})).ok
    metrics = _metrics_when(port, lambda m: m["in_flight"] == 0 and not server.scheduler._rows)
    assert metrics["in_flight"] == 0 and not server.scheduler._rows
    assert metrics["responses_by_status"].get("499", 0) + metrics["responses_by_status"]["200"] == 2


def test_vector_library_checks_its_directory(qwen, tmp_path, vectors_dir):
    with pytest.raises(ResidlabError, match="no vector directory"):
        VectorLibrary.from_directory(tmp_path / "missing", qwen)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResidlabError, match="holds no"):
        VectorLibrary.from_directory(tmp_path / "empty", qwen)
    random_vector(qwen, [0]).save(vectors_dir / "alpha.gguf.safetensors")  # stem 'alpha.gguf' is fine
    assert "alpha.gguf" in VectorLibrary.from_directory(vectors_dir, qwen).names()


def test_server_default_vector_applies_to_requests_without_steering(qwen, vectors_dir):
    library = VectorLibrary.from_directory(vectors_dir, qwen)
    vector = library.get("alpha")
    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0, vector=vector, strength=3.0, vectors=library)) as s:
        port = s.server_address[1]
        default = send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 6}))
        steering = {"vector": "alpha", "strength": 3.0, "positions": "prompt_last+generated"}
        named = send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 6, "steering": steering}))
    assert default.ok and default.text == named.text


def _metrics_when(port, ready, tries=200):
    """/metrics once ``ready(metrics)`` holds (or after ``tries`` polls 25 ms apart)."""
    for _ in range(tries):
        metrics = json.loads(_get(port, "/metrics"))
        if ready(metrics):
            return metrics
        time.sleep(0.025)
    return metrics


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


def test_grouped_scheduler_serves_concurrent_requests(qwen, vectors_dir):
    """The llama.cpp scheduler (groups by steering), here on the torch engine: answers as alone."""
    library = VectorLibrary.from_directory(vectors_dir, qwen)
    bodies = [
        {
            "messages": MESSAGES,
            "max_tokens": 4 + i % 3,
            **({"steering": {"vector": "beta", "strength": 2.0}} if i % 2 else {}),
        }
        for i in range(6)
    ]
    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0, vectors=library, scheduler="grouped")) as s:
        assert json.loads(_get(s.server_address[1], "/health"))["scheduler"] == "grouped-scheduler"
        together, _ = concurrent(s.server_address[1], [LoadRequest(CHAT, b) for b in bodies], timeout=60)
    assert [o.text for o in together] == [expected_text(qwen, library, b) for b in bodies]


def test_a_failing_batch_is_a_500_or_an_error_event_and_the_server_goes_on(server, qwen, monkeypatch):
    port = server.server_address[1]

    def broken(*args, **kwargs):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(qwen, "_call", broken)
    whole = send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 3}))
    streamed = send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 3, "stream": True}))
    monkeypatch.undo()
    assert whole.status == 500 and "device on fire" in whole.error
    assert streamed.status == 200 and "device on fire" in streamed.error
    assert send(port, LoadRequest(CHAT, {"messages": MESSAGES, "max_tokens": 3})).ok


def test_many_clients_connecting_at_once_are_all_accepted(server):
    """Regression: with the standard library's listen backlog of 5, 32 simultaneous clients got resets."""
    requests = [
        LoadRequest(CHAT, {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 2}) for i in range(48)
    ]
    outcomes, _ = concurrent(server.server_address[1], requests, timeout=60)
    assert [o.error for o in outcomes if not o.ok] == []


def test_batches_between_two_metrics_snapshots():
    from residlab.serving.loadtest import batches_between

    before = {"batch_size": {"histogram": {"1": 3, "4": 1}}}
    after = {"batch_size": {"histogram": {"1": 4, "4": 1, "8": 2}}}
    assert batches_between(before, after) == ({"1": 1, "8": 2}, (1 + 16) / 3)
    assert batches_between(after, after) == ({}, None)
