"""A small OpenAI-compatible chat-completions server for a (possibly steered) residlab model.

``residlab serve`` exposes ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health`` on
loopback by default, on any engine (``--engine``). One generation runs at a time (engines are not
thread-safe); it is meant for local tools, such as another residlab run that uses it as the teacher
for concise traces.

It survives its clients: the body size is checked before the body is read (413), every field is
validated (422, :mod:`residlab.serving.schema`), the prompt and the token budget are capped by the
server's limits and the model's context (400), and a failure inside one request is answered 500
while the server goes on.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from residlab.core.errors import ResidlabError
from residlab.engines import Engine, SamplingParams, SteeringSpec, as_engine
from residlab.interventions.positions import PositionRule
from residlab.models.lm import LanguageModel
from residlab.serving.schema import ChatCompletionRequest, ServerLimits
from residlab.vectors.steering_vector import SteeringVector


class RequestError(Exception):
    """A request the server answers with a 4xx status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may stall mid-request before its connection is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        route = self.path.rstrip("/")
        if route in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": self.server.engine.name, "object": "model"}]})
        elif route == "/health":
            self._send(200, {"status": "ok", "model": self.server.engine.name})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._error(404, f"no route {self.path}")
            return
        try:
            request = self._read_request()
            self._send(200, self.server.complete(request))
        except RequestError as err:
            self._error(err.status, err.message)
        except ResidlabError as err:
            self._error(400, err.message + (f" ({err.hint})" if err.hint else ""))
        except Exception as err:  # noqa: BLE001 - one request's failure must not take the server down
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"internal error: {type(err).__name__}: {err}")

    def _read_request(self) -> ChatCompletionRequest:
        limits = self.server.limits
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        try:
            length = int(length_header)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length_header!r}") from None
        if length < 0 or length > limits.max_body_bytes:
            self.close_connection = True  # the body stays unread
            raise RequestError(413, f"the request body has {length} bytes; this server takes at most "
                               f"{limits.max_body_bytes}")  # fmt: skip
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(payload, dict):
            raise RequestError(400, f"the body must be a JSON object, not {type(payload).__name__}")
        try:
            return ChatCompletionRequest.model_validate(payload)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
            raise RequestError(422, f"invalid request: {problems}") from None


def check_port_free(host: str, port: int) -> None:
    """A clear error now, before a model is loaded, if ``host:port`` cannot be bound."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ResidlabError(
                f"cannot serve on {host}:{port}: {err.strerror or err}.",
                hint="another program (or residlab serve) holds that port: pass --port with a free one "
                "(0 picks any), or stop the other server.",
            ) from None


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        model: LanguageModel | Engine,
        host: str = "127.0.0.1",
        port: int = 8000,
        vector: SteeringVector | None = None,
        strength: float = 0.0,
        positions: PositionRule = "prompt_last+generated",
        limits: ServerLimits | None = None,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.engine = as_engine(model)
        self.steering = SteeringSpec(vector, strength, positions) if vector is not None and strength else None
        self.limits = limits or ServerLimits()
        self.context_length = _context_length(self.engine)
        self._lock = threading.Lock()

    def _budget(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        """The new-token budget, checked against the server's limits and the model's context."""
        limits = self.limits
        if request.stream:
            raise RequestError(400, "streaming is not supported by this server; send stream=false")
        if prompt_tokens > limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {prompt_tokens} tokens; this server takes at most "
                               f"{limits.max_prompt_tokens}")  # fmt: skip
        room = None if self.context_length is None else self.context_length - prompt_tokens
        budget = request.token_budget(limits, room)
        if budget > limits.max_new_tokens:
            raise RequestError(400, f"max_tokens={budget} is more than this server's limit of "
                               f"{limits.max_new_tokens} new tokens")  # fmt: skip
        if self.context_length is not None and prompt_tokens + budget > self.context_length:
            raise RequestError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens={budget} exceed the "
                               f"model's context of {self.context_length} tokens")  # fmt: skip
        return budget

    def complete(self, request: ChatCompletionRequest) -> dict[str, Any]:
        messages = [m.as_template_message() for m in request.messages]
        prompt_tokens = len(self.engine.tokenize(self.engine.format_prompt(messages, chat=True)))
        budget = self._budget(request, prompt_tokens)
        sampling = SamplingParams(
            max_new_tokens=budget,
            temperature=0.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
        )
        with self._lock:
            generation = self.engine.generate([messages], sampling, steering=self.steering, chat=True)[0]
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


def _context_length(engine: Engine) -> int | None:
    """The model's context in tokens, where the engine can tell."""
    value = getattr(engine, "context_length", None)
    if value is None:
        config = getattr(getattr(getattr(engine, "lm", None), "model", None), "config", None)
        value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


@contextlib.contextmanager
def serving_in_background(server: ModelServer) -> Iterator[ModelServer]:
    """Run ``server`` in a thread for the duration of the block (tests, notebooks)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
