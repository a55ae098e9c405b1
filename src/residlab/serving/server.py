"""A small OpenAI-compatible chat-completions server for a (possibly steered) residlab model.

``residlab serve`` exposes ``POST /v1/chat/completions`` and ``GET /v1/models`` on loopback by
default, on any engine (``--engine``). One request is served at a time (engines are not
thread-safe); it is meant for local tools, such as another residlab run that uses it as the
teacher for concise traces.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.engines import Engine, SamplingParams, SteeringSpec, as_engine
from residlab.models.lm import LanguageModel
from residlab.vectors.steering_vector import SteeringVector


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": self.server.engine.name, "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            messages = request["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
        except (ValueError, KeyError, TypeError) as err:
            self._error(400, f"bad request: {err}")
            return
        try:
            reply = self.server.complete(request)
        except ResidlabError as err:  # e.g. sampling parameters out of range
            self._error(400, f"bad request: {err.message}" + (f" ({err.hint})" if err.hint else ""))
            return
        self._send(200, reply)


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        model: LanguageModel | Engine,
        host: str = "127.0.0.1",
        port: int = 8000,
        vector: SteeringVector | None = None,
        strength: float = 0.0,
        positions: str = "prompt_last+generated",
    ) -> None:
        super().__init__((host, port), _Handler)
        self.engine = as_engine(model)
        self.steering = SteeringSpec(vector, strength, positions) if vector is not None and strength else None
        self._lock = threading.Lock()

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            sampling = SamplingParams(
                max_new_tokens=int(request.get("max_tokens") or 256),
                temperature=float(request.get("temperature") or 0.0),
                top_p=float(request.get("top_p") or 1.0),
                seed=request.get("seed"),
            )
            generation = self.engine.generate([request["messages"]], sampling, steering=self.steering, chat=True)[0]
        prompt_tokens = len(self.engine.tokenize(generation.prompt))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.engine.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "finish_reason": "length" if generation.hit_limit else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": generation.num_tokens,
                "total_tokens": prompt_tokens + generation.num_tokens,
            },
        }


@contextlib.contextmanager
def serving_in_background(server: ModelServer):
    """Run ``server`` in a thread for the duration of the block (tests, notebooks)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
