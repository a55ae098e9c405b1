"""Concise traces from a teacher: any OpenAI-compatible chat-completions endpoint (``--teacher-url``).

Answers are cached per endpoint and model (append-only JSONL, each as it arrives), so a rerun or a killed
run asks only for the problems still missing. Several requests are kept in flight: a serving engine
(``residlab serve``, vLLM, llama.cpp's server) batches concurrent requests, one at a time wastes it.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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

    def keep(future: Future[str], problem: Problem, sha: str) -> None:
        stored = store.append([{"id": problem.id, "concise": future.result(), "problem_sha": sha}])
        done[problem.id] = str(stored[0]["concise"])
        if bar is not None:
            bar.update(1)

    pool = ThreadPoolExecutor(max_workers=teacher.concurrency)
    pending: dict[Future[str], tuple[Problem, str]] = {pool.submit(ask, p): (p, sha) for p, sha in todo.values()}
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            errors = [e for f in finished if (e := f.exception()) is not None]
            for future in finished:
                problem, sha = pending.pop(future)
                if future.exception() is None:
                    keep(future, problem, sha)
            if errors:
                # Requests not yet sent are dropped; those on their way are waited for and kept, so a rerun
                # asks only for what is still missing.
                for future in list(pending):
                    if future.cancel():
                        del pending[future]
                for future in wait(pending).done:
                    if future.exception() is None:
                        keep(future, *pending[future])
                raise errors[0]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: do not wait for the queue
        if bar is not None:
            bar.close()
    return [done[p.id] for p in problems]
