"""ASC stage 1: paired reasoning traces for one calibration problem each: the model's own verbose chain
of thought and a concise, math-centric one from a chosen source.

Sources of the concise side (a registry, :data:`CONCISE_SOURCES`, of plain callables): ``reference``
(the dataset's solution), ``self`` (the model under the concise prompt), ``sampled`` (the shortest
correct of N of the model's own samples under the plain prompt: same style, same prompt, only
shorter), ``teacher`` (an OpenAI-compatible endpoint), ``rewrite`` (the model's own correct trace
rewritten densely by the teacher endpoint, or by the model itself without one; kept only when the
rewrite still reaches the gold answer and keeps the trace's computations), ``prune``, ``prune-prose`` and
``prune-equations`` (the model's own correct trace with its plan and units cut; also its narrating
sentences; or everything but the lines that compute: :mod:`residlab.methods.asc.prune`; no endpoint,
every token the model's own) and ``file``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl
from residlab.data import Problem
from residlab.engines import Engine
from residlab.evaluation.grading import grade
from residlab.evaluation.records import EvalRecord
from residlab.evaluation.runner import Condition, Decoding, evaluate
from residlab.methods.asc import prompts
from residlab.methods.asc.config import CompressConfig
from residlab.methods.asc.prune import Cut, prune_trace
from residlab.methods.asc.teacher import TeacherClient, teacher_traces
from residlab.models.lm import LanguageModel

# The ``sampled`` source decodes like the ASC paper (temperature 0.7, top-p 0.9).
SAMPLE_TEMPERATURE = 0.7
SAMPLE_TOP_P = 0.9
KEEP_FILTERS = ("both_correct", "concise_correct", "all")
# A rewrite must keep at least this share of the trace's intermediate numbers (see keeps_computations).
KEPT_COMPUTATIONS = 0.5
# 1,000 and 1,200.50 as one number each; (1,2) as two; .5 as 0.5.
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+")


@dataclass(frozen=True)
class TracePair:
    """One problem's verbose and concise traces, their lengths and grades."""

    id: str
    question: str
    verbose: str
    concise: str
    verbose_tokens: int
    concise_tokens: int
    verbose_correct: bool
    concise_correct: bool
    concise_source: str


class ConciseTrace(NamedTuple):
    """A concise trace and whether it is usable: it reaches the gold answer (a rewrite must also keep its
    trace's computations, :func:`keeps_computations`)."""

    text: str
    correct: bool


@dataclass(frozen=True)
class PairRequest:
    """What a concise source is given: the problems, their verbose records, and how to generate and cache."""

    runner: LanguageModel | Engine
    problems: Sequence[Problem]
    verbose: Sequence[EvalRecord]  # one per problem, in order
    decoding: Decoding
    work_dir: Path
    keep: str
    samples: int
    teacher: TeacherClient | None
    pairs_file: Path | None
    progress: bool


ConciseSource = Callable[[PairRequest], list[ConciseTrace]]  # one trace per problem, in order


def reference_trace(problem: Problem) -> str:
    """The dataset's solution (calculator marks already removed), ending in ``\\boxed{answer}`` like the
    model's own traces do."""
    solution = problem.solution.strip()
    if "\\boxed" not in solution:
        solution = f"{solution}\n\\boxed{{{problem.answer}}}"
    return solution


def _graded(text: str, problem: Problem) -> ConciseTrace:
    return ConciseTrace(text, grade(text, problem.answer, dataset=problem.dataset)[1])


def reference_source(request: PairRequest) -> list[ConciseTrace]:
    """The dataset's solutions (correct by definition)."""
    return [ConciseTrace(reference_trace(p), True) for p in request.problems]


def self_source(request: PairRequest) -> list[ConciseTrace]:
    """The model's own greedy traces under the concise prompt."""
    condition = Condition("concise_self", prompts.CONCISE)
    records = evaluate(
        request.runner, request.problems, condition, request.decoding, request.work_dir, progress=request.progress
    )
    return [ConciseTrace(r.output, r.correct) for r in records]


def sampled_source(request: PairRequest) -> list[ConciseTrace]:
    """The shortest correct of ``samples`` samples under the plain prompt (see :func:`shortest_correct`)."""
    # With both_correct, problems whose verbose trace is wrong are dropped anyway: sample only the rest.
    wanted = [
        p for p, v in zip(request.problems, request.verbose, strict=True) if request.keep != "both_correct" or v.correct
    ]
    shortest = _shortest_correct_samples(request, wanted)
    return [shortest.get(p.id, ConciseTrace("", False)) for p in request.problems]


def teacher_source(request: PairRequest) -> list[ConciseTrace]:
    """A teacher endpoint's traces under the concise prompt (cached)."""
    if request.teacher is None:
        raise ResidlabError("the teacher source needs a teacher endpoint.", hint="pass --teacher-url.")
    texts = teacher_traces(
        request.teacher, request.problems, request.work_dir, request.decoding.max_new_tokens, progress=request.progress
    )
    return [_graded(text, p) for text, p in zip(texts, request.problems, strict=True)]


def _numbers(text: str) -> set[str]:
    """The numbers written in ``text``, normalised (no thousands commas, LaTeX's ``{,}`` included; no
    leading or trailing zeros)."""
    out = set()
    for raw in _NUMBER.findall(text.replace("{,}", ",")):
        number = raw.replace(",", "")
        if "." in number:
            number = number.rstrip("0").rstrip(".")
        out.add(number.lstrip("0") or "0")
    return out


def keeps_computations(
    rewrite: str, trace: str, question: str, answer: str = "", share: float = KEPT_COMPUTATIONS
) -> bool:
    """Whether ``rewrite`` still shows the computations of ``trace``: at least ``share`` of the trace's
    intermediate results (the numbers it writes that neither the question nor the ``answer`` does)
    appear in it. A rewrite that jumps to ``\\boxed{answer}`` reaches the gold answer but is no
    derivation: small rewriters often do that, and such a pair teaches "skip the reasoning", not
    "reason densely"."""
    intermediate = _numbers(trace) - _numbers(question) - _numbers(answer)
    if not intermediate:
        return True
    return len(intermediate & _numbers(rewrite)) >= share * len(intermediate)


def rewrite_source(request: PairRequest) -> list[ConciseTrace]:
    """The model's own correct verbose traces, rewritten as dense derivations (:data:`prompts.REWRITE`) by
    the teacher endpoint, else by the model itself (greedy, cached like every trace). A problem whose
    verbose trace is wrong gets no rewrite (an empty, wrong trace: the filter drops it); a rewrite counts
    as correct when it reaches the gold answer and :func:`keeps_computations` of the trace."""
    wanted = [
        replace(p, question=prompts.REWRITE.format(question=p.question, trace=v.output))
        for p, v in zip(request.problems, request.verbose, strict=True)
        if v.solved
    ]
    if request.teacher is not None:
        texts = teacher_traces(
            request.teacher,
            wanted,
            request.work_dir,
            request.decoding.max_new_tokens,
            template="{question}",
            tag="rewrite",
            progress=request.progress,
        )
        rewritten = {p.id: _graded(text, p) for p, text in zip(wanted, texts, strict=True)}
    else:
        records = evaluate(
            request.runner, wanted, Condition("rewrite", "{question}"), request.decoding, request.work_dir,
            progress=request.progress,
        )  # fmt: skip
        rewritten = {r.id: ConciseTrace(r.output, r.solved) for r in records}
    out = []
    for problem, verbose in zip(request.problems, request.verbose, strict=True):
        text, correct = rewritten.get(problem.id, ConciseTrace("", False))
        kept = keeps_computations(text, verbose.output, problem.question, problem.answer)
        out.append(ConciseTrace(text, correct and kept))
    return out


def _pruned(request: PairRequest, cut: Cut) -> list[ConciseTrace]:
    """Each correct verbose trace pruned (:func:`prune_trace`), graded again and held to
    :func:`keeps_computations`; a wrong one gives an empty, wrong trace (the filter drops it)."""
    out = []
    for problem, verbose in zip(request.problems, request.verbose, strict=True):
        if not verbose.solved:
            out.append(ConciseTrace("", False))
            continue
        text, correct = _graded(prune_trace(verbose.output, cut=cut), problem)
        kept = keeps_computations(text, verbose.output, problem.question, problem.answer)
        out.append(ConciseTrace(text, correct and kept))
    return out


def prune_source(request: PairRequest) -> list[ConciseTrace]:
    """The model's own correct traces without their announced plan and their units."""
    return _pruned(request, "plan")


def prune_prose_source(request: PairRequest) -> list[ConciseTrace]:
    """The model's own correct traces without plan and units, and each prose line cut to its last sentence."""
    return _pruned(request, "prose")


def prune_equations_source(request: PairRequest) -> list[ConciseTrace]:
    """The model's own correct traces cut to the lines that compute or answer: its derivation, no prose."""
    return _pruned(request, "equations")


def file_source(request: PairRequest) -> list[ConciseTrace]:
    """A user's JSONL file of ``id`` and ``concise`` traces (see :func:`read_pairs_file`)."""
    if request.pairs_file is None:
        raise ResidlabError("the file source needs a pairs file.", hint="pass --pairs-file FILE.jsonl.")
    traces = read_pairs_file(request.pairs_file)
    missing = [p.id for p in request.problems if p.id not in traces]
    if missing:
        raise ResidlabError(
            f"the pairs file has no concise trace for {len(missing)} problem(s), e.g. {missing[:3]}.",
            hint='add a line {"id": ..., "concise": ...} for each problem id, or lower --pairs.',
        )
    return [_graded(traces[p.id], p) for p in request.problems]


CONCISE_SOURCES: dict[str, ConciseSource] = {
    "reference": reference_source,
    "self": self_source,
    "sampled": sampled_source,
    "teacher": teacher_source,
    "rewrite": rewrite_source,
    "prune": prune_source,
    "prune-prose": prune_prose_source,
    "prune-equations": prune_equations_source,
    "file": file_source,
}


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
    if keep not in KEEP_FILTERS:
        raise ResidlabError(f"unknown filter {keep!r}.", hint="use both_correct, concise_correct or all.")
    work_dir = Path(work_dir)
    verbose = evaluate(runner, problems, Condition("verbose", prompts.VERBOSE), decoding, work_dir, progress=progress)
    request = PairRequest(
        runner, problems, verbose, decoding, work_dir, keep, samples, teacher, _path(pairs_file), progress
    )
    concise = CONCISE_SOURCES[source](request)
    pairs = [
        TracePair(
            id=problem.id,
            question=problem.question,
            verbose=v.output,
            concise=c.text,
            verbose_tokens=v.tokens,
            concise_tokens=len(lm.tokenizer(c.text)["input_ids"]),
            verbose_correct=v.correct,
            concise_correct=c.correct,
            concise_source=source,
        )
        for problem, v, c in zip(problems, verbose, concise, strict=True)
    ]
    return _filter(pairs, keep, max_concise_ratio)


def _path(path: str | Path | None) -> Path | None:
    return Path(path) if path is not None else None


def _filter(
    pairs: Sequence[TracePair], keep: str, max_concise_ratio: float | None
) -> tuple[list[TracePair], dict[str, int]]:
    """The pairs ``keep`` and ``max_concise_ratio`` let through, and how many each reason dropped."""
    kept, dropped = [], {"verbose_wrong": 0, "concise_wrong": 0, "concise_not_shorter": 0}
    for pair in pairs:
        if keep == "both_correct" and not pair.verbose_correct:
            dropped["verbose_wrong"] += 1
        elif keep != "all" and not pair.concise_correct:
            dropped["concise_wrong"] += 1
        elif max_concise_ratio is not None and pair.concise_tokens > max_concise_ratio * pair.verbose_tokens:
            dropped["concise_not_shorter"] += 1
        else:
            kept.append(pair)
    return kept, dropped


def _shortest_correct_samples(request: PairRequest, problems: Sequence[Problem]) -> dict[str, ConciseTrace]:
    """id -> the shortest correct of ``request.samples`` sampled traces under the plain prompt, else the
    shortest sample (marked wrong). Each sample index is its own cached condition (its seed)."""
    if request.samples < 1:
        raise ResidlabError(
            f"the sampled source needs at least one sample, got {request.samples}.", hint="pass --pair-samples 4."
        )
    samples_per_id: dict[str, list[EvalRecord]] = {}
    for index in range(request.samples):
        sampling = replace(request.decoding, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=index)
        condition = Condition("sample", prompts.VERBOSE)
        records = evaluate(request.runner, problems, condition, sampling, request.work_dir, progress=request.progress)
        for record in records:
            samples_per_id.setdefault(record.id, []).append(record)
    return {key: shortest_correct(records) for key, records in samples_per_id.items()}


def shortest_correct(records: Sequence[EvalRecord]) -> ConciseTrace:
    """The shortest correct generation record's output, else the shortest one's (marked wrong). A record
    cut off at the token limit never counts as correct (its answer was not reached by the trace)."""
    best = min(records, key=lambda r: (not r.solved, r.tokens))
    return ConciseTrace(best.output, best.solved)


@dataclass(frozen=True)
class PairStats:
    """How many pairs one concise source gave and how long their two sides are (for the report)."""

    n_problems: int
    n_pairs: int
    dropped: dict[str, int]
    mean_verbose_tokens: float
    mean_concise_tokens: float


def compress_pairs(
    lm: LanguageModel,
    cfg: CompressConfig,
    source: str,
    problems: Sequence[Problem],
    work_dir: Path,
    engine: Engine | None = None,
) -> tuple[list[TracePair], PairStats]:
    """Pairs from one concise source, filtered as ``cfg`` says, and their statistics; fewer than two is an error."""
    pairs, dropped = build_pairs(
        lm,
        problems,
        source=source,
        work_dir=work_dir,
        decoding=cfg.decoding(),
        keep=cfg.keep,
        teacher=(
            TeacherClient(cfg.teacher_url, cfg.teacher_model, concurrency=cfg.teacher_concurrency)
            if cfg.teacher_url
            else None
        ),
        pairs_file=cfg.pairs_file,
        engine=engine,
        samples=cfg.pair_samples,
        max_concise_ratio=cfg.max_concise_ratio,
    )
    if len(pairs) < 2:
        raise ResidlabError(
            f"only {len(pairs)} usable {source} pair(s) out of {len(problems)} ({dropped}).",
            hint="raise --pairs, or use --keep concise_correct / --keep all.",
        )
    stats = PairStats(
        n_problems=len(problems),
        n_pairs=len(pairs),
        dropped=dropped,
        mean_verbose_tokens=sum(p.verbose_tokens for p in pairs) / len(pairs),
        mean_concise_tokens=sum(p.concise_tokens for p in pairs) / len(pairs),
    )
    return pairs, stats
