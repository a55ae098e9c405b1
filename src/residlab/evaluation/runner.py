"""Run a dataset under a generation condition into append-only records; resumable after a kill."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from residlab.core.errors import ResidlabError
from residlab.core.generation import Generation, SamplingParams
from residlab.core.records import JsonlStore, WorkClaims
from residlab.data import Problem
from residlab.engines import Engine, SteeringSpec, as_engine
from residlab.evaluation.grading import grade
from residlab.evaluation.records import EvalRecord, problem_fingerprint, record_key
from residlab.interventions.schedules import StrengthSchedule
from residlab.models.lm import LanguageModel
from residlab.vectors.steering_vector import SteeringVector


@dataclass(frozen=True)
class Decoding:
    """How to decode (identical across the conditions being compared)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        # The sampling fields are checked as SamplingParams checks them, before any record is written.
        SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.seed)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ResidlabError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}.",
                                hint="pass --batch-size 1 or more.")  # fmt: skip

    def describe(self) -> str:
        """How the tokens are chosen, for a log line: ``greedy`` or the sampling settings."""
        if self.temperature == 0:
            return "greedy"
        return f"sampled at temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed}"


@dataclass(frozen=True)
class Condition:
    """A prompt template (with ``{question}``), an optional system message and optional steering.

    ``strength`` multiplies ``vector`` as stored; ``schedule`` (optional) scales it per generated
    token (:mod:`residlab.interventions.schedules`).
    """

    name: str
    template: str = "{question}"
    system: str | None = None
    vector: SteeringVector | None = None
    strength: float = 0.0
    positions: str = "prompt_last+generated"
    schedule: StrengthSchedule | None = None

    @property
    def steered(self) -> bool:
        return self.vector is not None and self.strength != 0

    def fingerprint(self, decoding: Decoding, model_name: str, engine: str = "torch") -> str:
        """A short hash of everything that changes the outputs: records are only reused when it matches."""
        vector_hash = None
        if self.steered:
            digest = hashlib.sha256()
            for layer, tensor in self.vector.directions.items():  # type: ignore[union-attr]
                digest.update(str(layer).encode())
                digest.update(tensor.numpy().tobytes())
            vector_hash = digest.hexdigest()
        payload = {
            "model": model_name,
            "engine": engine,
            "template": self.template,
            "system": self.system,
            "vector": vector_hash,
            "strength": self.strength if self.steered else 0,
            "positions": self.positions if self.steered else None,
            "decoding": asdict(decoding),
        }
        if self.steered and self.schedule is not None:
            # Only adaptive conditions carry the key: every constant-strength fingerprint is unchanged.
            payload["schedule"] = self.schedule.describe()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def records_path(out_dir: Path, condition: Condition, decoding: Decoding, model: LanguageModel | Engine) -> Path:
    """Where a condition's records live: the file name carries the fingerprint of what produced them,
    the engine's identity (kind, weights, dtype) included."""
    engine = as_engine(model)
    return records_file(out_dir, condition, decoding, engine.name, engine.identity)


def records_file(out_dir: Path, condition: Condition, decoding: Decoding, model_name: str, identity: str) -> Path:
    """:func:`records_path` for an engine known by its name and identity (one on another machine)."""
    return out_dir / f"{condition.name}-{condition.fingerprint(decoding, model_name, identity)}.jsonl"


def evaluate(
    model: LanguageModel | Engine,
    problems: Sequence[Problem],
    condition: Condition,
    decoding: Decoding,
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> list[EvalRecord]:
    """Generate and grade every problem under ``condition``; return one record per problem, in order.

    Records already in the condition's file (same fingerprint) are reused, so a killed or smaller
    earlier run is continued, never redone; new records are appended after every batch.
    """
    engine = as_engine(model)
    store = JsonlStore(records_path(Path(out_dir), condition, decoding, engine), unique_key=record_key)
    done = matching_records(store, problems)
    todo = [p for p in problems if p.id not in done]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(problems), initial=len(problems) - len(todo), desc=condition.name, unit="problem", file=sys.stderr
        )
    if todo:
        _generate_missing(engine, store, todo, condition, decoding, done, bar)
    if bar is not None:
        bar.close()
    return [done[p.id] for p in problems]


def _generate_missing(
    engine: Engine,
    store: JsonlStore,
    todo: list[Problem],
    condition: Condition,
    decoding: Decoding,
    done: dict[str, EvalRecord],
    bar: Any,
) -> None:
    """Generate the planned batches of ``todo`` into ``store`` and ``done``. A batch another run is
    generating right now is left to the end and then waited for (by then it is usually stored), so two
    runs started at once share the work instead of generating the same batches twice."""
    with WorkClaims(store.path) as claims:
        deferred = []
        for batch in plan_batches(todo, decoding):
            if not claims.try_claim(batch[0].id):
                deferred.append(batch)
                continue
            _run_claimed(engine, store, claims, batch, condition, decoding, done)
            if bar is not None:
                bar.update(len(batch))
        for batch in deferred:
            claims.claim(batch[0].id)
            _run_claimed(engine, store, claims, batch, condition, decoding, done)
            if bar is not None:
                bar.update(len(batch))


def _run_claimed(
    engine: Engine,
    store: JsonlStore,
    claims: WorkClaims,
    batch: list[Problem],
    condition: Condition,
    decoding: Decoding,
    done: dict[str, EvalRecord],
) -> None:
    """Generate, grade and store what of a claimed ``batch`` is not stored yet; release the claim."""
    try:
        # another run on the same records may have done some of them meanwhile: share its work
        done.update(matching_records(store, batch))
        chunk = [p for p in batch if p.id not in done]
        if chunk:
            fresh = run_batch(engine, chunk, condition, decoding, seed=batch_seed(decoding, batch))
            # What the store holds for them: a concurrent run that stored one first wins, no duplicate.
            stored = store.append(r.to_json() for r in fresh)
            done.update((r["id"], EvalRecord.from_json(r)) for r in stored)
    finally:
        claims.release(batch[0].id)


def plan_batches(todo: Sequence[Problem], decoding: Decoding) -> list[list[Problem]]:
    """The batches the problems still to do are generated in, in order (every runner, local or
    distributed, plans them alike, so their outputs and seeds are the same)."""
    return [list(todo[start : start + decoding.batch_size]) for start in range(0, len(todo), decoding.batch_size)]


def batch_seed(decoding: Decoding, batch: Sequence[Problem]) -> int:
    """The sampling seed of a planned batch: it follows the batch's first problem, so sampled outputs
    depend neither on a concurrent run nor on which worker runs the batch."""
    return int(hashlib.sha256(f"{decoding.seed}:{batch[0].id}".encode()).hexdigest()[:8], 16)


def run_batch(
    engine: Engine, problems: Sequence[Problem], condition: Condition, decoding: Decoding, *, seed: int
) -> list[EvalRecord]:
    """Generate and grade one batch of problems under ``condition`` (nothing is stored)."""
    use_chat = engine.has_chat_template
    steering = (
        SteeringSpec(condition.vector, condition.strength, condition.positions, schedule=condition.schedule)  # type: ignore[arg-type]
        if condition.steered
        else None
    )
    prompts = [condition.template.format(question=p.question) for p in problems]
    generations = engine.generate(
        prompts,
        SamplingParams(decoding.max_new_tokens, decoding.temperature, decoding.top_p, seed),
        steering=steering,
        chat=use_chat if use_chat else False,
        system=condition.system if use_chat else None,
        batch_size=decoding.batch_size,
    )
    return [graded_record(p, condition.name, g) for p, g in zip(problems, generations, strict=True)]


class Evaluator(Protocol):
    """What runs a condition over problems into records: :func:`evaluate` in this process, or a
    distributed runner (``residlab.distributed``) with the same signature and the same records."""

    def __call__(
        self,
        model: LanguageModel | Engine,
        problems: Sequence[Problem],
        condition: Condition,
        decoding: Decoding,
        out_dir: str | Path,
    ) -> list[EvalRecord]: ...


def matching_records(store: JsonlStore, problems: Sequence[Problem]) -> dict[str, EvalRecord]:
    """id -> the stored record made for each problem as it is now (a record for an edited question or
    gold answer is not reused: the problem is generated again)."""
    wanted = {p.id: p for p in problems}
    found: dict[str, EvalRecord] = {}
    for record in read_records(store):
        problem = wanted.get(record.id)
        if problem is not None and record.id not in found and record.matches(problem):
            found[record.id] = record
    return found


def graded_record(problem: Problem, condition: str, generation: Generation) -> EvalRecord:
    """Grade one generation against its problem's gold answer (times rounded as they are stored)."""
    extraction, correct = grade(generation.text, problem.answer, dataset=problem.dataset)
    return EvalRecord(
        id=problem.id,
        condition=condition,
        output=generation.text,
        tokens=generation.num_tokens,
        hit_limit=generation.hit_limit,
        seconds=round(generation.seconds, 4),
        batch_seconds=round(generation.batch_seconds, 4),
        batch_size=generation.batch_size,
        extracted=extraction.value,
        rule=extraction.rule,
        gold=problem.answer,
        correct=bool(correct),
        time=round(time.time(), 1),
        problem_sha=problem_fingerprint(problem),
    )


def read_records(store: JsonlStore) -> list[EvalRecord]:
    """Every complete record in ``store``; a record that is not an evaluation record names its file."""
    records = []
    for number, data in enumerate(store.read(), start=1):
        try:
            records.append(EvalRecord.from_json(data))
        except ResidlabError as err:
            raise ResidlabError(f"{store.path}, record {number}: {err.message}", hint=err.hint) from None
    return records
