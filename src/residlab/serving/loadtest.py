"""A bounded load test of a running server on loopback: the same requests one at a time, then from many
concurrent clients; zero errors expected, and every concurrent answer equal to the one-at-a-time answer.

Used by ``benchmarks/serve_load.py`` (a real model, 32 clients) and by the tests (a tiny model). Requests
are plain OpenAI bodies (``stream: true`` ones are read as server-sent events and their chunks joined).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LoadRequest:
    """One request of the load: its route and body."""

    path: str
    body: dict[str, Any]

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(frozen=True)
class Outcome:
    """What one request got back: status, text, completion tokens (non-streamed), seconds, chunks."""

    status: int
    text: str
    tokens: int
    seconds: float
    chunks: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def _text_of(payload: dict[str, Any]) -> str:
    choice = payload["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _delta_of(payload: dict[str, Any]) -> str:
    choice = payload["choices"][0]
    return choice.get("delta", {}).get("content") or "" if "delta" in choice else choice.get("text") or ""


def send(port: int, request: LoadRequest, timeout: float = 300.0) -> Outcome:
    """Send ``request`` to ``127.0.0.1:port`` and read the whole answer (never raises)."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", request.path, body=json.dumps(request.body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200 or not request.streamed:
            payload = json.loads(response.read() or b"{}")
            if response.status != 200:
                message = payload.get("error", {}).get("message", "")
                return Outcome(response.status, "", 0, time.perf_counter() - began, error=message)
            tokens = int(payload["usage"]["completion_tokens"])
            return Outcome(200, _text_of(payload), tokens, time.perf_counter() - began)
        pieces, chunks, error = [], 0, ""
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                error = event["error"]["message"]
                continue
            chunks += 1
            pieces.append(_delta_of(event))
        return Outcome(200, "".join(pieces), 0, time.perf_counter() - began, chunks, error)
    except Exception as err:  # noqa: BLE001 - a failed request is an outcome to report
        return Outcome(0, "", 0, time.perf_counter() - began, error=f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def one_at_a_time(port: int, requests: Sequence[LoadRequest], timeout: float = 300.0) -> tuple[list[Outcome], float]:
    """Each request alone, in order; the outcomes and the wall-clock seconds."""
    began = time.perf_counter()
    outcomes = [send(port, request, timeout) for request in requests]
    return outcomes, time.perf_counter() - began


def concurrent(port: int, requests: Sequence[LoadRequest], timeout: float = 300.0) -> tuple[list[Outcome], float]:
    """Every request from its own client thread, released together; outcomes (in order) and wall seconds."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    start = threading.Barrier(len(requests) + 1)

    def client(i: int) -> None:
        start.wait()
        outcomes[i] = send(port, requests[i], timeout)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout + 30)
    wall = time.perf_counter() - began
    return [o or Outcome(0, "", 0, wall, error="client thread did not finish") for o in outcomes], wall


def summarize(outcomes: Sequence[Outcome], wall: float, tokens: Sequence[int]) -> dict[str, Any]:
    """Errors, latency percentiles and throughput (``tokens``: completion tokens per request)."""
    latencies = np.asarray([o.seconds for o in outcomes])
    total = int(sum(tokens))
    return {
        "requests": len(outcomes),
        "errors": sum(not o.ok for o in outcomes),
        "wall_s": wall,
        "completion_tokens": total,
        "tokens_per_s": total / wall if wall > 0 else None,
        "requests_per_s": len(outcomes) / wall if wall > 0 else None,
        "latency_s": {
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
            "mean": float(latencies.mean()),
            "max": float(latencies.max()),
        },
    }


def mismatches(solo: Sequence[Outcome], together: Sequence[Outcome]) -> list[int]:
    """Indices of requests whose concurrent text differs from their one-at-a-time text (or failed)."""
    return [i for i, (a, b) in enumerate(zip(solo, together, strict=True)) if not (a.ok and b.ok and a.text == b.text)]


def batches_between(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, int], float | None]:
    """The forward passes' batch sizes between two ``GET /metrics`` snapshots (``ServerMetrics.snapshot``):
    the histogram (size -> passes, sizes that occurred) and the mean batch (None: no pass)."""
    earlier = before["batch_size"]["histogram"]
    histogram = {k: v - earlier.get(k, 0) for k, v in after["batch_size"]["histogram"].items() if v - earlier.get(k, 0)}
    passes = sum(histogram.values())
    return histogram, (sum(int(k) * v for k, v in histogram.items()) / passes if passes else None)
