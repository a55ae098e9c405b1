"""The server survives its clients: limits, validation, and a bounded load test with hostile requests."""

import http.client
import json
import resource
import threading

import pytest

from residlab.serving.schema import ServerLimits
from residlab.serving.server import ModelServer, serving_in_background

GOOD = {"messages": [{"role": "user", "content": "Natalia sold"}], "max_tokens": 4}


def post(port, body, *, headers=None, path="/v1/chat/completions", timeout=60):
    """(status, parsed JSON) of one POST; ``body`` may be bytes (sent as is) or an object (JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture
def server(qwen):
    limits = ServerLimits(max_body_bytes=64 * 1024, max_prompt_tokens=200, max_new_tokens=32)
    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0, limits=limits)) as running:
        yield running


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({**GOOD, "max_tokens": 10**9}, 400, "more than this server's limit of 32"),
        ({**GOOD, "max_tokens": -5}, 422, "max_tokens"),
        ({**GOOD, "max_tokens": 0}, 422, "max_tokens"),
        ({**GOOD, "max_tokens": "abc"}, 422, "max_tokens"),
        ({**GOOD, "max_tokens": True}, 422, "max_tokens"),
        ({**GOOD, "stream": "yes"}, 422, "stream"),
        ({**GOOD, "messages": ["hi"]}, 422, "messages.0"),
        ({**GOOD, "messages": []}, 422, "messages"),
        ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 422, "role"),
        ({**GOOD, "temperature": -1}, 422, "temperature"),
        ({**GOOD, "top_p": 0}, 422, "top_p"),
        ({**GOOD, "steering": {"vector": "../etc/passwd"}}, 400, "never paths"),
        ({"max_tokens": 4}, 422, "messages"),
        ([1, 2], 400, "JSON object"),
        (b"{not json", 400, "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 422, "temperature"),
        ({**GOOD, "messages": [{"role": "user", "content": "word " * 1000}]}, 400, "prompt has"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(server, body, status, message):
    got, payload = post(server.server_address[1], body)
    assert got == status, payload
    assert message in payload["error"]["message"]


def test_oversized_body_is_refused_before_it_is_read(server):
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))  # 50 MB announced, never sent
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "at most 65536" in json.loads(response.read())["error"]["message"]
    conn.close()
    assert post(port, GOOD)[0] == 200  # and the server goes on


def test_bounded_load_with_hostile_requests_interleaved(server, qwen):
    port = server.server_address[1]
    expected = qwen.generate([GOOD["messages"]], max_new_tokens=4)[0].text
    hostile = [
        b"\x00\xff garbage",
        {**GOOD, "max_tokens": 10**9},
        {**GOOD, "messages": "hi"},
        {**GOOD, "messages": [{"role": "user", "content": "x" * 60_000}]},
        {**GOOD, "seed": -1},
    ]
    results: list[tuple[str, int, object]] = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def client(worker: int) -> None:
        for i in range(8):  # bounded: 4 clients x 8 requests
            if (worker + i) % 2:
                status, payload = post(port, GOOD)
                text = payload["choices"][0]["message"]["content"] if status == 200 else payload
                results.append(("good", status, text))
            else:
                status, payload = post(port, hostile[(worker + i) % len(hostile)])
                results.append(("hostile", status, payload))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert len(results) == 32
    for kind, status, payload in results:
        if kind == "good":
            assert (status, payload) == (200, expected)
        else:
            assert 400 <= status < 500, payload
    assert post(port, GOOD)[0] == 200  # alive at the end
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 300


def test_what_openai_clients_send_is_accepted(server, qwen):
    port = server.server_address[1]
    expected = qwen.generate([GOOD["messages"]], max_new_tokens=4)[0].text
    nulls = {**GOOD, "temperature": None, "top_p": None, "seed": None}
    parts = {**GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": "Natalia sold"}]}]}
    for body in (nulls, parts):
        status, payload = post(port, body)
        assert (status, payload["choices"][0]["message"]["content"]) == (200, expected)
    status, _ = post(port, {**GOOD, "messages": [{"role": "developer", "content": "Be brief."}, *GOOD["messages"]]})
    assert status == 200


def test_no_max_tokens_never_exceeds_the_servers_own_limit(qwen):
    limits = ServerLimits(max_new_tokens=3)  # below the default of 256
    assert limits.default_new_tokens == 3
    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0, limits=limits)) as running:
        status, payload = post(running.server_address[1], {"messages": GOOD["messages"]})
    assert status == 200 and payload["usage"]["completion_tokens"] <= 3
