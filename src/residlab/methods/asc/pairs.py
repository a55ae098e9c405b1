"""Paired reasoning traces for one calibration problem each: the model's own verbose chain of thought
and a concise, math-centric one from a chosen source.

Sources of the concise side: ``reference`` (the dataset's solution), ``self`` (the model under the
concise prompt), ``sampled`` (the shortest correct of N of the model's own samples under the plain
prompt: same style, same prompt, only shorter), ``teacher`` (an OpenAI-compatible endpoint) and
``file``."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl
from residlab.data import Problem
from residlab.engines import Engine
from residlab.evaluation.grading import grade
from residlab.evaluation.runner import Condition, Decoding, evaluate
from residlab.methods.asc import prompts
from residlab.models.lm import LanguageModel

CONCISE_SOURCES = ("reference", "self", "sampled", "teacher", "file")
# The ``sampled`` source decodes like the ASC paper (temperature 0.7, top-p 0.9).
SAMPLE_TEMPERATURE = 0.7
SAMPLE_TOP_P = 0.9


@dataclass(frozen=True)
class TracePair:
    id: str
    question: str
    verbose: str
    concise: str
    verbose_tokens: int
    concise_tokens: int
    verbose_correct: bool
    concise_correct: bool
    concise_source: str


def reference_trace(problem: Problem) -> str:
    """The dataset's solution (calculator marks already removed), ending in ``\\boxed{answer}`` like the
    model's own traces do."""
    solution = problem.solution.strip()
    if "\\boxed" not in solution:
        solution = f"{solution}\n\\boxed{{{problem.answer}}}"
    return solution


class TeacherClient:
    """Concise traces from any OpenAI-compatible chat-completions endpoint (``--teacher-url``)."""

    def __init__(self, url: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout

    def complete(self, question: str, max_tokens: int) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompts.CONCISE.format(question=question)}],
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


def read_pairs_file(path: str | Path) -> dict[str, str]:
    """id -> concise trace from a user's JSONL file (fields ``id`` and ``concise``), read strictly:
    a last line without a trailing newline is a record like any other."""
    traces = {}
    for lineno, record in iter_jsonl(path, what="pairs file"):
        if "id" not in record or "concise" not in record:
            raise ResidlabError(
                f"{path}:{lineno}: needs the fields 'id' and 'concise' (it has {sorted(record)}).",
                hint='write one {"id": "gsm8k-train-00000", "concise": "..."} object per line.',
            )
        traces[str(record["id"])] = str(record["concise"])
    return traces


def build_pairs(
    lm: LanguageModel,
    problems: Sequence[Problem],
    *,
    source: str = "reference",
    work_dir: str | Path,
    decoding: Decoding,
    keep: str = "both_correct",
    teacher: TeacherClient | None = None,
    pairs_file: str | Path | None = None,
    progress: bool = True,
    engine: Engine | None = None,
    samples: int = 4,
    max_concise_ratio: float | None = None,
) -> tuple[list[TracePair], dict[str, int]]:
    """Build one pair per problem and filter them; return (kept pairs, counts of what was dropped).

    Generation records are cached under ``work_dir`` (append-only), so a rerun or a larger ``problems``
    list reuses every trace already generated. ``keep``: ``both_correct`` (default), ``concise_correct``
    or ``all``. ``engine`` generates the traces (default: the torch engine on ``lm``). ``samples``: how
    many samples the ``sampled`` source draws per problem. ``max_concise_ratio`` (optional): a pair is
    dropped (``concise_not_shorter``) unless its concise trace has at most this fraction of the verbose tokens.
    """
    runner = engine if engine is not None else lm
    if source not in CONCISE_SOURCES:
        raise ResidlabError(f"unknown concise source {source!r}.", hint=f"use one of {', '.join(CONCISE_SOURCES)}.")
    if keep not in ("both_correct", "concise_correct", "all"):
        raise ResidlabError(f"unknown filter {keep!r}.", hint="use both_correct, concise_correct or all.")
    work_dir = Path(work_dir)
    verbose = evaluate(runner, problems, Condition("verbose", prompts.VERBOSE), decoding, work_dir, progress=progress)
    if source == "self":
        concise_records = evaluate(
            runner, problems, Condition("concise_self", prompts.CONCISE), decoding, work_dir, progress=progress
        )
        concise = [(r["output"], bool(r["correct"])) for r in concise_records]
    elif source == "sampled":
        # With both_correct, problems whose verbose trace is wrong are dropped anyway: sample only the rest.
        wanted = [p for p, v in zip(problems, verbose, strict=True) if keep != "both_correct" or v["correct"]]
        shortest = _shortest_correct_samples(runner, wanted, decoding, work_dir, samples, progress)
        concise = [shortest.get(p.id, ("", False)) for p in problems]
    elif source == "reference":
        concise = [(reference_trace(p), True) for p in problems]
    elif source == "teacher":
        if teacher is None:
            raise ResidlabError("the teacher source needs a teacher endpoint.", hint="pass --teacher-url.")
        concise = _teacher_traces(teacher, problems, work_dir, decoding.max_new_tokens)
    else:
        if pairs_file is None:
            raise ResidlabError("the file source needs a pairs file.", hint="pass --pairs-file FILE.jsonl.")
        traces = read_pairs_file(pairs_file)
        missing = [p.id for p in problems if p.id not in traces]
        if missing:
            raise ResidlabError(
                f"the pairs file has no concise trace for {len(missing)} problem(s), e.g. {missing[:3]}."
            )
        concise = [(traces[p.id], grade(traces[p.id], p.answer, dataset=p.dataset)[1]) for p in problems]

    pairs, dropped = [], {"verbose_wrong": 0, "concise_wrong": 0, "concise_not_shorter": 0}
    for problem, v, (c_text, c_correct) in zip(problems, verbose, concise, strict=True):
        if keep == "both_correct" and not v["correct"]:
            dropped["verbose_wrong"] += 1
            continue
        pair = TracePair(
            id=problem.id,
            question=problem.question,
            verbose=v["output"],
            concise=c_text,
            verbose_tokens=int(v["tokens"]),
            concise_tokens=len(lm.tokenizer(c_text)["input_ids"]),
            verbose_correct=bool(v["correct"]),
            concise_correct=c_correct,
            concise_source=source,
        )
        if keep != "all" and not pair.concise_correct:
            dropped["concise_wrong"] += 1
            continue
        if max_concise_ratio is not None and pair.concise_tokens > max_concise_ratio * pair.verbose_tokens:
            dropped["concise_not_shorter"] += 1
            continue
        pairs.append(pair)
    return pairs, dropped


def _shortest_correct_samples(
    runner: LanguageModel | Engine,
    problems: Sequence[Problem],
    decoding: Decoding,
    work_dir: Path,
    samples: int,
    progress: bool,
) -> dict[str, tuple[str, bool]]:
    """id -> (trace, correct): the shortest correct of ``samples`` sampled traces under the plain prompt,
    else the shortest sample (marked wrong). Traces cut off at the token limit never count as correct.
    Each sample index is its own cached condition (its seed)."""
    if samples < 1:
        raise ResidlabError(
            f"the sampled source needs at least one sample, got {samples}.", hint="pass --pair-samples 4."
        )
    samples_per_id: dict[str, list[dict]] = {}
    for index in range(samples):
        sampling = replace(decoding, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=index)
        records = evaluate(
            runner, problems, Condition("sample", prompts.VERBOSE), sampling, work_dir, progress=progress
        )
        for record in records:
            samples_per_id.setdefault(record["id"], []).append(record)
    return {key: shortest_correct(records) for key, records in samples_per_id.items()}


def shortest_correct(records: Sequence[dict]) -> tuple[str, bool]:
    """(output, correct) of the shortest correct generation record, else of the shortest one. A record
    cut off at the token limit never counts as correct (its answer was not reached by the trace)."""

    def key(record: dict) -> tuple[bool, int]:
        return (not (record["correct"] and not record["hit_limit"]), int(record["tokens"]))

    best = min(records, key=key)
    return best["output"], not key(best)[0]


def _teacher_traces(
    teacher: TeacherClient, problems: Sequence[Problem], work_dir: Path, max_tokens: int
) -> list[tuple[str, bool]]:
    from residlab.core.records import JsonlStore

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{teacher.url}-{teacher.model}")[-80:]
    store = JsonlStore(work_dir / f"teacher-{safe}.jsonl")
    done = {r["id"]: r["concise"] for r in store.read()}
    for problem in problems:
        if problem.id not in done:
            text = teacher.complete(problem.question, max_tokens)
            store.append([{"id": problem.id, "concise": text}])
            done[problem.id] = text
    return [(done[p.id], grade(done[p.id], p.answer, dataset=p.dataset)[1]) for p in problems]
