"""One request in flight between an HTTP handler and a scheduler, and the scheduler interface.

The handler thread builds a :class:`Job` (token ids, sampling, resolved steering) and submits it; the
scheduler's thread generates and pushes the new tokens into the job as they come. The handler reads
them back (all at once, or streamed); a client that goes away cancels its job, which the scheduler
drops at its next step.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

from residlab.core.generation import SamplingParams
from residlab.serving.steering import ResolvedSteering


class RequestError(Exception):
    """A request the server answers with a 4xx (or 503) status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Finished:
    """The end of a job: whether it stopped at ``max_new_tokens`` (else at an end-of-sequence token)."""

    hit_limit: bool


@dataclass(eq=False)  # a job is itself: compared by identity
class Job:
    """A tokenised prompt to complete, with its own sampling and steering."""

    token_ids: tuple[int, ...]
    sampling: SamplingParams
    steering: ResolvedSteering | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    _events: queue.Queue = field(default_factory=queue.Queue)

    # -- the scheduler's side -------------------------------------------------------------------
    def emit(self, tokens: list[int]) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._events.put(tokens)

    def finish(self, hit_limit: bool) -> None:
        self._events.put(Finished(hit_limit))

    def fail(self, error: BaseException) -> None:
        self._events.put(error)

    # -- the handler's side ---------------------------------------------------------------------
    def tokens(self, timeout: float) -> Iterator[list[int]]:
        """New token ids as they come; returns the :class:`Finished` at the end (``StopIteration.value``).
        Raises what the scheduler failed with, or :class:`RequestError` 504 after ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                self.cancelled.set()
                raise RequestError(504, f"the generation took longer than this server's {timeout:.0f} s") from None
            if isinstance(event, Finished):
                return event  # type: ignore[return-value]
            if isinstance(event, BaseException):
                raise event
            yield event


class Scheduler(ABC):
    """Runs jobs on an engine in a thread of its own; ``submit`` never blocks on the model."""

    name: str

    def __init__(self, max_queue: int) -> None:
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; a full queue is a 503 (the client may retry), never a wait."""
        if self._stop.is_set():
            raise RequestError(503, "the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(
                503, f"the server is busy ({self._queue.maxsize} requests queued); retry later"
            ) from None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"residlab-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for job in self._in_progress():
            job.fail(RequestError(503, "the server is shutting down"))
        while True:  # whoever still waits gets an answer
            try:
                self._queue.get_nowait().fail(RequestError(503, "the server is shutting down"))
            except queue.Empty:
                break

    def _take(self, limit: int, *, wait: bool) -> list[Job]:
        """Up to ``limit`` queued jobs that are not cancelled; with ``wait``, block briefly for the first."""
        jobs: list[Job] = []
        if wait:
            try:
                jobs.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                return jobs
        while len(jobs) < limit:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return [job for job in jobs if not job.cancelled.is_set()]

    def _in_progress(self) -> list[Job]:
        """Jobs taken from the queue and not finished (answered 503 when the scheduler stops)."""
        return []

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()

    @abstractmethod
    def step(self) -> None:
        """One turn of the scheduler's loop: admit work and advance it (never raises)."""
