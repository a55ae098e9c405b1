"""The teacher source against a real HTTP server on loopback (residlab's own OpenAI-compatible server)."""

import json
import urllib.request

import pytest

from residlab import ResidlabError
from residlab.data import synthetic_problems
from residlab.evaluation.runner import Decoding
from residlab.methods.asc.pairs import TeacherClient, build_pairs
from residlab.serving.server import ModelServer, serving_in_background


def test_openai_compatible_endpoint(qwen):
    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0)) as server:
        port = server.server_address[1]
        body = json.dumps(
            {"model": "x", "messages": [{"role": "user", "content": "Natalia sold"}], "max_tokens": 5}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert reply["object"] == "chat.completion"
        assert reply["usage"]["completion_tokens"] >= 1
        expected = qwen.generate([[{"role": "user", "content": "Natalia sold"}]], max_new_tokens=5)[0].text
        assert reply["choices"][0]["message"]["content"] == expected
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30).read())
        assert models["data"][0]["id"] == qwen.name
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=30)
        assert info.value.code == 422  # no messages


def test_teacher_pairs_from_a_local_server(qwen, tmp_path):
    problems = synthetic_problems(3, seed=5)
    with serving_in_background(ModelServer(qwen, "127.0.0.1", 0)) as server:
        teacher = TeacherClient(f"http://127.0.0.1:{server.server_address[1]}/v1", model="tiny")
        pairs, dropped = build_pairs(
            qwen,
            problems,
            source="teacher",
            work_dir=tmp_path,
            teacher=teacher,
            decoding=Decoding(max_new_tokens=6, batch_size=3),
            keep="all",
            progress=False,
        )
    assert len(pairs) == 3 and all(p.concise_source == "teacher" for p in pairs)
    cached = next(tmp_path.glob("teacher-*.jsonl")).read_text().splitlines()
    assert len(cached) == 3
    # cached traces are reused: no server is needed the second time
    again, _ = build_pairs(
        qwen,
        problems,
        source="teacher",
        work_dir=tmp_path,
        teacher=teacher,
        decoding=Decoding(max_new_tokens=6, batch_size=3),
        keep="all",
        progress=False,
    )
    assert [p.concise for p in again] == [p.concise for p in pairs]


def test_unreachable_teacher_is_a_clear_error(qwen, tmp_path):
    teacher = TeacherClient("http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(ResidlabError, match="teacher endpoint"):
        build_pairs(
            qwen,
            synthetic_problems(1),
            source="teacher",
            work_dir=tmp_path,
            teacher=teacher,
            decoding=Decoding(max_new_tokens=2),
            keep="all",
            progress=False,
        )
