"""Concise traces from a teacher: any OpenAI-compatible chat-completions endpoint (``--teacher-url``).

Answers are cached per endpoint and model (append-only JSONL), so a rerun asks only for new problems.
"""

from __future__ import annotations

import json
import re
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
    """Concise traces from any OpenAI-compatible chat-completions endpoint (``--teacher-url``)."""

    def __init__(self, url: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout

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
) -> list[str]:
    """The teacher's trace for every problem under ``template``, in order; cached under ``work_dir`` per
    ``tag``, endpoint and model, and per problem content (an edited question or answer is asked again;
    older entries without the content hash are matched by id)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{teacher.url}-{teacher.model}")[-80:]
    store = JsonlStore(work_dir / f"{tag}-{safe}.jsonl", unique_key=lambda r: (r.get("id"), r.get("problem_sha")))
    cached = store.read()
    done: dict[str, str] = {}
    for problem in problems:
        sha = problem_fingerprint(problem)
        found = [r for r in cached if r.get("id") == problem.id and r.get("problem_sha") in (sha, None)]
        if found:
            done[problem.id] = str(found[-1]["concise"])
            continue
        # The concise prompt is complete()'s default (a client written for it takes no template).
        text = (
            teacher.complete(problem.question, max_tokens)
            if template == prompts.CONCISE
            else teacher.complete(problem.question, max_tokens, template)
        )
        stored = store.append([{"id": problem.id, "concise": text, "problem_sha": sha}])
        done[problem.id] = str(stored[0]["concise"])
    return [done[p.id] for p in problems]
