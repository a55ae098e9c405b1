"""What ``GET /metrics`` reports: requests by status, in flight, tokens, batch sizes and latencies.

Thread-safe counters updated by the HTTP handlers (requests, latency) and by the scheduler (forward
passes and their batch sizes, tokens generated). Latencies are kept for the last
:data:`LATENCY_WINDOW` requests, so the percentiles describe recent traffic in bounded memory.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np

LATENCY_WINDOW = 2048


def _percentiles(values: deque[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    array = np.asarray(values)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(array.mean())}


class ServerMetrics:
    """Counters of one server's life (see the module docstring); :meth:`snapshot` is the JSON served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[str] = Counter()  # by route
        self.statuses: Counter[int] = Counter()
        self.in_flight = 0
        self.prompt_tokens = 0
        self.tokens_generated = 0
        self.forward_passes = 0
        self.batch_sizes: Counter[int] = Counter()  # rows per forward pass -> passes
        self.latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.first_token: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # -- the handlers' side ---------------------------------------------------------------------
    def begin(self, route: str) -> None:
        with self._lock:
            self.requests[route] += 1
            self.in_flight += 1

    def end(self, status: int, seconds: float, first_token_seconds: float | None = None, prompt_tokens: int = 0):
        with self._lock:
            self.in_flight -= 1
            self.statuses[status] += 1
            self.prompt_tokens += prompt_tokens
            if status == 200:
                self.latency.append(seconds)
                if first_token_seconds is not None:
                    self.first_token.append(first_token_seconds)

    # -- the scheduler's side -------------------------------------------------------------------
    def record_step(self, rows: int, tokens_in: int) -> None:
        with self._lock:
            self.forward_passes += 1
            self.batch_sizes[rows] += 1

    def record_tokens(self, count: int) -> None:
        with self._lock:
            self.tokens_generated += count

    def snapshot(self, queued: int = 0) -> dict[str, Any]:
        """The metrics as a JSON-ready dict."""
        with self._lock:
            passes = sum(self.batch_sizes.values())
            mean_batch = sum(size * n for size, n in self.batch_sizes.items()) / passes if passes else None
            return {
                "uptime_s": time.time() - self.started,
                "requests": dict(self.requests),
                "responses_by_status": {str(k): v for k, v in sorted(self.statuses.items())},
                "in_flight": self.in_flight,
                "queued": queued,
                "prompt_tokens": self.prompt_tokens,
                "tokens_generated": self.tokens_generated,
                "forward_passes": self.forward_passes,
                "batch_size": {
                    "mean": mean_batch,
                    "histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                },
                "latency_s": _percentiles(self.latency),
                "time_to_first_token_s": _percentiles(self.first_token),
            }
