"""Concise traces from a teacher: any OpenAI-compatible chat-completions endpoint (``--teacher-url``).

Answers are cached per endpoint and model (append-only JSONL, each as it arrives), so a rerun or a killed
run asks only for the problems still missing. Several requests are kept in flight: a serving engine
(``residlab serve``, vLLM, llama.cpp's server) batches concurrent requests, one at a time wastes it.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from residlab.core.errors import ResidlabError
from residlab.core.records import JsonlStore
from residlab.data import Problem
from residlab.evaluation.records import problem_fingerprint
from residlab.methods.asc import prompts


class TeacherClient:
    """Concise traces from any OpenAI-compatible chat-completions endpoint (``--teacher-url``).

    ``concurrency``: requests :func:`teacher_traces` keeps in flight (the server batches them).
    ``timeout``: seconds one request may take; a CPU server answering a full batch of long traces
    needs minutes, so it is generous.
    """

    def __init__(
        self,
        url: str,
        model: str = "default",
        api_key: str | None = None,
        timeout: float = 900.0,
        concurrency: int = 8,
    ) -> None:
        if concurrency < 1:
            raise ResidlabError(
                f"teacher concurrency {concurrency} is below 1.", hint="keep at least one request in flight."
            )
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.concurrency = concurrency

    def complete(self, question: str, max_tokens: int, template: str = prompts.CONCISE) -> str:
        """The teacher's greedy answer to ``question`` under ``template`` (default: the concise prompt)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": template.format(question=question)}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
            return payload["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as err:
            raise ResidlabError(
                f"the teacher endpoint {self.url} failed: {err}",
                hint="check --teacher-url (an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1) and "
                "--teacher-model.",
            ) from None


def teacher_traces(
    teacher: TeacherClient,
    problems: Sequence[Problem],
    work_dir: Path,
    max_tokens: int,
    *,
    template: str = prompts.CONCISE,
    tag: str = "teacher",
    progress: bool = False,
) -> list[str]:
    """The teacher's trace for every problem under ``template``, in order; cached under ``work_dir`` per
    ``tag``, endpoint and model, and per problem content (an edited question or answer is asked again;
    older entries without the content hash are matched by id). Up to ``teacher.concurrency`` requests
    are in flight; each answer is stored as it arrives, so a failed or killed run keeps what it got.
    ``progress`` shows a bar over the problems."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{teacher.url}-{teacher.model}")[-80:]
    store = JsonlStore(work_dir / f"{tag}-{safe}.jsonl", unique_key=lambda r: (r.get("id"), r.get("problem_sha")))
    cached = store.read()
    done: dict[str, str] = {}
    todo: dict[str, tuple[Problem, str]] = {}
    for problem in problems:
        sha = problem_fingerprint(problem)
        found = [r for r in cached if r.get("id") == problem.id and r.get("problem_sha") in (sha, None)]
        if found:
            done[problem.id] = str(found[-1]["concise"])
        else:
            todo.setdefault(problem.id, (problem, sha))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=tag, unit="problem", file=sys.stderr)

    def ask(problem: Problem) -> str:
        # The concise prompt is complete()'s default (a client written for it takes no template).
        if template == prompts.CONCISE:
            return teacher.complete(problem.question, max_tokens)
        return teacher.complete(problem.question, max_tokens, template)

    def keep(problem: Problem, sha: str, text: str) -> None:
        stored = store.append([{"id": problem.id, "concise": text, "problem_sha": sha}])
        done[problem.id] = str(stored[0]["concise"])
        if bar is not None:
            bar.update(1)

    # Daemon threads, not a ThreadPoolExecutor: Ctrl-C must end the run now, not after the requests in
    # flight return (an executor's threads are joined at exit). Every answer is stored by this thread.
    queued: queue.SimpleQueue[tuple[Problem, str]] = queue.SimpleQueue()
    for item in todo.values():
        queued.put(item)
    answers: queue.SimpleQueue[tuple[Problem, str, str | Exception]] = queue.SimpleQueue()  # a text or a failure
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                problem, sha = queued.get_nowait()
            except queue.Empty:
                return
            try:
                answers.put((problem, sha, ask(problem)))
            except Exception as err:  # noqa: BLE001 - handed to the caller's thread, raised there
                answers.put((problem, sha, err))

    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(teacher.concurrency, len(todo)))]
    for worker in workers:
        worker.start()
    error: Exception | None = None
    received = 0
    try:
        while received < len(todo):
            try:
                # After a failure, poll: a worker may stop between requests without answering.
                problem, sha, answer = answers.get(timeout=None if error is None else 0.1)
            except queue.Empty:
                if any(w.is_alive() for w in workers) or not answers.empty():
                    continue
                break  # after a failure: every request on its way has come back
            received += 1
            if isinstance(answer, Exception):
                # Send nothing more; answers already on their way are still kept, so a rerun asks
                # only for what is missing.
                stop.set()
                error = error or answer
            else:
                keep(problem, sha, answer)
    finally:
        stop.set()
        if bar is not None:
            bar.close()
    if error is not None:
        raise error
    return [done[p.id] for p in problems]
