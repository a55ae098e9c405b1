"""An OpenAI-compatible server for a (possibly steered) residlab model that batches concurrent requests.

``residlab serve`` exposes ``POST /v1/chat/completions`` and ``POST /v1/completions`` (with
``stream: true``: server-sent events in OpenAI's chunk format), ``GET /v1/models``, ``/v1/vectors``,
``/health`` and ``/metrics``, on loopback by default. Requests run concurrently: on the torch engine a
:class:`~residlab.serving.continuous.ContinuousBatcher` adds each one to the running batch at the next
decode step, with its own steering (``steering`` in the body: vectors by name from the server's
``--vectors`` directory, strength, layers, position rule) applied per row; on llama.cpp a
:class:`~residlab.serving.grouped.GroupedScheduler` batches requests that steer alike.

It survives its clients: the body size is checked before the body is read (413), every field is
validated (422, :mod:`residlab.serving.schema`), the prompt, the token budget and the steering are
checked against the server's limits, its vectors and the model (400), a full queue is a 503, a
generation past the time limit a 504, and a failure inside one batch is answered 500 to its requests
while the server goes on. HTTP is the standard library's threaded server (no other HTTP stack is a
dependency); each connection has a thread, the model has one (the scheduler's).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from residlab.core.errors import ResidlabError
from residlab.engines import Engine, SamplingParams, as_engine
from residlab.interventions.positions import PHASED_RULES, PositionRule, steering_phases
from residlab.models.lm import LanguageModel
from residlab.serving.grouped import GroupedScheduler
from residlab.serving.jobs import Finished, Job, RequestError, Scheduler
from residlab.serving.metrics import ServerMetrics
from residlab.serving.openai_format import ROUTES, Route, TextDeltas, chunk, completion, finish_reason, sse
from residlab.serving.schema import ChatCompletionRequest, CompletionRequest, GenerationRequest, ServerLimits
from residlab.serving.steering import ResolvedSteering, VectorLibrary
from residlab.vectors.steering_vector import SteeringVector

__all__ = ["ModelServer", "RequestError", "check_port_free", "serving_in_background"]


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
        server = self.server
        if route in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": server.engine.name, "object": "model"}]})
        elif route == "/health":
            self._send(200, server.health())
        elif route in ("/metrics", "/v1/metrics"):
            self._send(200, server.metrics.snapshot(queued=server.scheduler.queued))
        elif route in ("/v1/vectors", "/vectors"):
            self._send(200, {"object": "list", "data": [{"id": n, "object": "vector"} for n in server.vectors.names()]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        route = ROUTES.get(self.path.rstrip("/"))
        if route is None:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._error(404, f"no route {self.path}")
            return
        metrics = self.server.metrics
        metrics.begin(route.path)
        began = time.perf_counter()
        status, job, prompt_tokens = 500, None, 0
        try:
            request = self._read_request(route)
            job, prompt_tokens = self.server.prepare(request, route)
            self.server.scheduler.submit(job)
            if request.stream:
                status = 200  # from the first byte on, errors go into the stream
                self._stream(route, job)
            else:
                self._send(200, self._complete(route, job, prompt_tokens))
                status = 200
        except RequestError as err:
            status = err.status
            self._error(err.status, err.message)
        except ResidlabError as err:
            status = 400
            self._error(400, err.message + (f" ({err.hint})" if err.hint else ""))
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the client went away
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - one request's failure must not take the server down
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"internal error: {type(err).__name__}: {err}")
        finally:
            if job is not None:
                job.cancelled.set()  # a no-op when it finished; frees its row when the client left
            first = None if job is None or job.first_token_at is None else job.first_token_at - job.submitted
            metrics.end(status, time.perf_counter() - began, first, prompt_tokens)

    def _complete(self, route: Route, job: Job, prompt_tokens: int) -> dict[str, Any]:
        tokens: list[int] = []
        stream = job.tokens(self.server.limits.request_timeout_s)
        finished = yield_all(stream, tokens)
        text = self.server.engine.tokenizer.decode(tokens, skip_special_tokens=True)
        return completion(route, self.server.engine.name, text, finished.hit_limit, prompt_tokens, len(tokens))

    def _stream(self, route: Route, job: Job) -> None:
        """Server-sent events in OpenAI's chunk format, then ``data: [DONE]``; the connection closes after."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        name, ident = self.server.engine.name, route.new_id()
        deltas = TextDeltas(self.server.engine.tokenizer)
        if route.chat:
            self._event(chunk(route, ident, name, None, role=True))
        stream = job.tokens(self.server.limits.request_timeout_s)
        try:
            while True:
                text = deltas.add(next(stream))
                if text:
                    self._event(chunk(route, ident, name, text))
        except StopIteration as stop:
            rest = deltas.flush()
            if rest:
                self._event(chunk(route, ident, name, rest))
            self._event(chunk(route, ident, name, None, finish=finish_reason(stop.value.hit_limit)))
        except (BrokenPipeError, ConnectionResetError):
            raise  # the client left: do_POST counts it and cancels the job
        except Exception as err:  # noqa: BLE001 - after the first byte an error can only be an event
            if not isinstance(err, RequestError | ResidlabError):
                traceback.print_exc(file=sys.stderr)
            self._event({"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}})
        self._event("[DONE]")

    def _event(self, payload: dict[str, Any] | str) -> None:
        self.wfile.write(sse(payload))
        self.wfile.flush()

    def _read_request(self, route: Route) -> GenerationRequest:
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
        schema = ChatCompletionRequest if route.chat else CompletionRequest
        try:
            return schema.model_validate(payload)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
            raise RequestError(422, f"invalid request: {problems}") from None


def yield_all(stream: Iterator[list[int]], into: list[int]) -> Finished:
    """Drain a job's token stream into ``into``; return its :class:`Finished`."""
    while True:
        try:
            into.extend(next(stream))
        except StopIteration as stop:
            return stop.value


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
    """The HTTP server around one engine and its scheduler (see the module docstring).

    ``vectors``: the steering vectors clients may name (a :class:`VectorLibrary`, from ``--vectors
    DIR``); ``vector``/``strength``/``positions``: the steering of requests that carry none.
    ``scheduler``: ``auto`` (continuous batching on the torch engine, groups by steering elsewhere),
    ``continuous`` or ``grouped``. ``max_batch``: the most requests decoded together.
    """

    daemon_threads = True
    # the listen backlog: the standard library's 5 resets connections when dozens of clients connect at once
    request_queue_size = 256

    def __init__(
        self,
        model: LanguageModel | Engine,
        host: str = "127.0.0.1",
        port: int = 8000,
        vector: SteeringVector | None = None,
        strength: float = 0.0,
        positions: PositionRule = "prompt_last+generated",
        limits: ServerLimits | None = None,
        *,
        vectors: VectorLibrary | None = None,
        scheduler: str = "auto",
        max_batch: int = 32,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.engine = as_engine(model)
        self.limits = limits or ServerLimits()
        self.vectors = vectors or VectorLibrary({})
        self.default_steering = None
        if vector is not None and strength:
            self.default_steering = ResolvedSteering(
                (("default", vector, float(strength)),), tuple(vector.layers), positions
            )
        self.context_length = _context_length(self.engine)
        self.metrics = ServerMetrics()
        self.scheduler = make_scheduler(self.engine, self.metrics, scheduler, max_batch, self.limits.max_queue)
        self.scheduler.start()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.engine.name,
            "engine": self.engine.kind,
            "scheduler": self.scheduler.name,
            "vectors": self.vectors.names(),
        }

    def server_close(self) -> None:
        self.scheduler.stop()
        super().server_close()

    def _budget(self, request: GenerationRequest, prompt_tokens: int) -> int:
        """The new-token budget, checked against the server's limits and the model's context."""
        limits = self.limits
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

    def prepare(self, request: GenerationRequest, route: Route) -> tuple[Job, int]:
        """The job a validated request asks for, and its prompt's length; a 4xx for what cannot run."""
        engine = self.engine
        if isinstance(request, ChatCompletionRequest):
            prompt: str = engine.format_prompt([m.as_template_message() for m in request.messages], chat=True)
            token_ids = engine.tokenize(prompt)
        else:
            assert isinstance(request, CompletionRequest)
            token_ids = engine.tokenize(request.text, add_special_tokens=True)
        if not token_ids:
            raise RequestError(400, "the prompt tokenised to nothing")
        budget = self._budget(request, len(token_ids))
        sampling = SamplingParams(
            max_new_tokens=budget,
            temperature=0.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
        )
        steering = self.default_steering
        if request.steering is not None:
            steering = self.vectors.resolve(request.steering, engine)
        if steering is not None:
            check_runnable(steering, len(token_ids), engine)
        return Job(tuple(token_ids), sampling, steering), len(token_ids)


def check_runnable(steering: ResolvedSteering, prompt_tokens: int, engine: Engine) -> None:
    """A 400 now for steering that would fail inside the batch: token indices outside the prompt, or a
    rule the engine cannot run (llama.cpp switches its control vector only between phases)."""
    rule = steering.rule
    if isinstance(rule, str):
        return
    outside = [i for i in rule if not -prompt_tokens <= i < prompt_tokens]
    if outside:
        raise RequestError(400, f"steering positions {outside} are outside the prompt of {prompt_tokens} tokens")
    if engine.kind != "torch" and steering_phases(rule) is None:
        raise RequestError(400, f"the {engine.kind} engine steers only by phase; use one of {', '.join(PHASED_RULES)}")


def make_scheduler(engine: Engine, metrics: ServerMetrics, kind: str, max_batch: int, max_queue: int) -> Scheduler:
    """``auto``: continuous batching on the torch engine, grouping by steering on any other."""
    if kind == "auto":
        kind = "continuous" if engine.kind == "torch" else "grouped"
    if kind == "continuous":
        if engine.kind != "torch":
            raise ResidlabError(
                f"continuous batching needs the torch engine, not {engine.kind}.",
                hint="use --scheduler grouped (or auto) with llama.cpp.",
            )
        from residlab.serving.continuous import ContinuousBatcher

        return ContinuousBatcher(engine, metrics, max_batch=max_batch, max_queue=max_queue)  # type: ignore[arg-type]
    if kind == "grouped":
        return GroupedScheduler(engine, metrics, max_batch=max_batch, max_queue=max_queue)
    raise ResidlabError(f"unknown scheduler {kind!r}.", hint="use auto, continuous or grouped.")


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
