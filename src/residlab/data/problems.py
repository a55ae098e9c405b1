"""Math word problems (GSM8K, MATH-500, your own JSONL, or built-in synthetic ones) as one ``Problem`` type."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl

DATA_DIR_ENV = "RESIDLAB_DATA_DIR"
KNOWN_DATASETS = ("gsm8k", "math500", "synthetic")
_SPLITS = {"gsm8k": ("train", "test"), "math500": ("test",), "synthetic": ("train", "test")}
_HUB_IDS = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}
_DEFAULT_SYNTHETIC_COUNT = 200
_NO_DATA_HINT = (
    f"pass --data-dir (data_dir=...) pointing at a folder with gsm8k/ and math500/, set {DATA_DIR_ENV}, "
    "install the `datasets` package to read from the Hugging Face hub, or use the built-in 'synthetic' problems."
)


@dataclass(frozen=True)
class Problem:
    """One problem with its gold final answer and a reference solution."""

    id: str
    question: str
    answer: str
    solution: str
    dataset: str
    # Excluded from the hash so a Problem stays hashable although meta is a dict.
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


# --------------------------------------------------------------------------- parsing helpers

_CALCULATOR_MARK = re.compile(r"<<.*?>>")


def strip_calculator_marks(text: str) -> str:
    """Remove GSM8K calculator annotations: ``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``."""
    return _CALCULATOR_MARK.sub("", text)


def split_gsm8k_answer(raw: str) -> tuple[str, str]:
    """Split a GSM8K ``answer`` field at its last ``####`` into ``(final answer, solution)``.

    The final answer loses its thousands separators; the solution loses its calculator marks.
    """
    reasoning, sep, final = raw.rpartition("####")
    if not sep:
        raise ValueError("no '####' marker before the final answer")
    answer = final.strip().replace(",", "")
    if not answer:
        raise ValueError("nothing after the '####' marker")
    return answer, strip_calculator_marks(reasoning).strip()


# --------------------------------------------------------------------------- locating data


def _candidate_data_dirs() -> Iterator[Path]:
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for ancestor in (start, *start.parents):
            yield ancestor / "shared" / "data"
            yield ancestor.parent / "shared" / "data"


def find_data_dir(explicit: str | Path | None = None) -> Path | None:
    """Where the local data sets live: ``explicit``, else ``$RESIDLAB_DATA_DIR``, else a ``shared/data`` nearby.

    A folder named explicitly (argument or environment) must exist; the search returns the first
    ``shared/data`` above the working directory or this file that holds ``gsm8k/`` or ``math500/``,
    or ``None``.
    """
    for value, origin in ((explicit, "data_dir"), (os.environ.get(DATA_DIR_ENV) or None, DATA_DIR_ENV)):
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ResidlabError(
                f"data folder {str(path)!r} (from {origin}) does not exist or is not a folder.",
                hint="point it at the folder that contains gsm8k/ and math500/.",
            )
        return path
    seen: set[Path] = set()
    for candidate in _candidate_data_dirs():
        if candidate in seen:
            continue
        seen.add(candidate)
        if (candidate / "gsm8k").is_dir() or (candidate / "math500").is_dir():
            return candidate
    return None


# --------------------------------------------------------------------------- JSONL


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-blank line (the strict reader of users' files)."""
    if not path.is_file() and not path.exists():
        raise ResidlabError(
            f"no JSONL file at {path}.",
            hint="check the path, or use 'gsm8k', 'math500' or 'synthetic' as the data set name.",
        )
    return iter_jsonl(path, what="JSONL file")


def _text_field(row: Mapping[str, Any], name: str, path: Path, lineno: int, *, required: bool = True) -> str | None:
    if name not in row or row[name] is None:
        if not required:
            return None
        raise ResidlabError(
            f"{path}:{lineno}: missing field {name!r} (fields present: {', '.join(sorted(row)) or 'none'}).",
            hint="choose the field names with question_field= / answer_field= (or fix the file).",
        )
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ResidlabError(
            f"{path}:{lineno}: field {name!r} must be a string or number, got {type(value).__name__}.",
            hint="fix that line of the file.",
        )
    return str(value)


def load_jsonl(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    solution_field: str | None = "solution",
    id_field: str | None = None,
    dataset: str = "jsonl",
    answer_parser: Callable[[str], tuple[str, str]] | None = None,
) -> list[Problem]:
    """Read problems from a JSONL file, one JSON object per line (blank lines skipped).

    The question and answer fields are required on every line. The solution and id fields are used
    where a line has them: a missing solution becomes ``""`` and a missing id ``"<file stem>-00012"``
    (0-based position). ``answer_parser`` turns the raw answer field into ``(final answer, solution)``
    (e.g. :func:`split_gsm8k_answer`); its solution is used where the line has no solution field.
    Every other field goes into ``meta``.
    """
    path = Path(path)
    used = {question_field, answer_field, solution_field, id_field}
    problems: list[Problem] = []
    for index, (lineno, row) in enumerate(_read_jsonl(path)):
        question = _text_field(row, question_field, path, lineno)
        answer = _text_field(row, answer_field, path, lineno)
        solution = _text_field(row, solution_field, path, lineno, required=False) if solution_field else None
        ident = _text_field(row, id_field, path, lineno, required=False) if id_field else None
        assert question is not None and answer is not None
        if answer_parser is not None:
            try:
                answer, parsed_solution = answer_parser(answer)
            except Exception as exc:
                raise ResidlabError(
                    f"{path}:{lineno}: could not parse field {answer_field!r}: {exc}.",
                    hint="fix that line, or pass a different answer_parser.",
                ) from exc
            solution = parsed_solution if solution is None else solution
        problems.append(
            Problem(
                id=ident if ident is not None else f"{path.stem}-{index:05d}",
                question=question,
                answer=answer.strip(),
                solution=solution or "",
                dataset=dataset,
                meta={k: v for k, v in row.items() if k not in used},
            )
        )
    return problems


# --------------------------------------------------------------------------- GSM8K / MATH-500 rows


def _gsm8k_problem(row: Mapping[str, Any], split: str, index: int) -> Problem:
    answer, solution = split_gsm8k_answer(str(row["answer"]))
    return Problem(
        id=f"gsm8k-{split}-{index:05d}",
        question=str(row["question"]),
        answer=answer,
        solution=solution,
        dataset="gsm8k",
    )


def _math500_problem(row: Mapping[str, Any], split: str, index: int) -> Problem:
    meta = {key: row[key] for key in ("unique_id", "subject", "level") if key in row}
    return Problem(
        id=f"math500-{split}-{index:05d}",
        question=str(row["problem"]),
        answer=str(row["answer"]).strip(),
        solution=str(row["solution"]),
        dataset="math500",
        meta=meta,
    )


_ROW_BUILDERS: dict[str, tuple[Callable[[Mapping[str, Any], str, int], Problem], tuple[str, ...]]] = {
    "gsm8k": (_gsm8k_problem, ("question", "answer")),
    "math500": (_math500_problem, ("problem", "solution", "answer")),
}


def _build(name: str, split: str, rows: Iterable[tuple[int, Mapping[str, Any]]], origin: str) -> list[Problem]:
    builder, required = _ROW_BUILDERS[name]
    problems = []
    for index, (lineno, row) in enumerate(rows):
        missing = [key for key in required if key not in row]
        try:
            if missing:
                raise ValueError(f"missing field(s) {', '.join(map(repr, missing))}")
            problems.append(builder(row, split, index))
        except ValueError as exc:
            raise ResidlabError(
                f"{origin}:{lineno}: not a {name} row: {exc}.",
                hint=f"this file does not look like the {name} data set; check the data folder.",
            ) from exc
    return problems


def _load_local(name: str, split: str, data_dir: Path) -> list[Problem]:
    path = data_dir / name / f"{split}.jsonl"
    if not path.is_file():
        raise ResidlabError(f"{name} {split} split not found at {str(path)!r}.", hint=_NO_DATA_HINT)
    return _build(name, split, _read_jsonl(path), origin=str(path))


def _load_hub(name: str, split: str) -> list[Problem]:
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise ResidlabError(
            f"cannot read {name} from the Hugging Face hub: the `datasets` package is not installed.",
            hint="pip install datasets, or " + _NO_DATA_HINT,
        ) from exc
    repo, config = _HUB_IDS[name]
    try:
        table = hf_datasets.load_dataset(repo, config, split=split)
    except Exception as exc:
        raise ResidlabError(
            f"could not load {repo} ({split}) from the Hugging Face hub: {exc}", hint=_NO_DATA_HINT
        ) from exc
    # Hub rows have no line numbers; number them as a file would be (1-based).
    return _build(name, split, ((i + 1, row) for i, row in enumerate(table)), origin=f"{repo} ({split})")


def _window(problems: list[Problem], offset: int, limit: int | None, origin: str = "the data set") -> list[Problem]:
    """Rows ``[offset : offset + limit]``; an empty result is an error (a run over nothing would report
    a table of NaN and exit 0)."""
    window = problems[offset:] if limit is None else problems[offset : offset + limit]
    if not window:
        where = f"rows {offset}..{offset + limit - 1}" if limit else f"rows from {offset} on"
        raise ResidlabError(
            f"no problems to run: {origin} has {len(problems)} problem(s), none in {where}.",
            hint="check the file (is it empty?), --offset and --limit (at least 1).",
        )
    return window


def load_problems(
    name: str,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    offset: int = 0,
    source: str = "auto",
) -> list[Problem]:
    """Load rows ``[offset : offset + limit]`` (file order) of a data set.

    ``name`` is ``"gsm8k"``, ``"math500"`` (split ``"test"`` only), ``"synthetic"`` (split picks the seed:
    test 0, train 1), or a path to a ``.jsonl`` file with question/answer/solution/id fields.
    ``source``: ``"auto"`` (local files, else the Hugging Face hub if ``datasets`` is installed),
    ``"local"`` or ``"hub"``.
    """
    if offset < 0 or (limit is not None and limit < 0):
        raise ResidlabError(
            f"offset and limit must not be negative (got offset={offset}, limit={limit}).",
            hint="pass --offset 0 or more and --limit 1 or more.",
        )
    if source not in ("auto", "local", "hub"):
        raise ResidlabError(f"unknown source {source!r}.", hint="use 'auto', 'local' or 'hub'.")
    key = name.lower()
    if key not in KNOWN_DATASETS:
        if name.endswith(".jsonl") or Path(name).is_file():
            problems = load_jsonl(name, id_field="id")
            return _window(problems, offset, limit, origin=name)
        raise ResidlabError(
            f"unknown data set {name!r}.",
            hint=f"use one of {', '.join(KNOWN_DATASETS)}, or the path to a .jsonl file.",
        )
    if split not in _SPLITS[key]:
        raise ResidlabError(f"{key} has no split {split!r}.", hint=f"use one of: {', '.join(_SPLITS[key])}.")
    if key == "synthetic":
        count = offset + (_DEFAULT_SYNTHETIC_COUNT if limit is None else limit)
        problems = synthetic_problems(count, seed=0 if split == "test" else 1)
        return _window(problems, offset, limit, origin=f"synthetic {split}")

    if source == "hub":
        return _window(_load_hub(key, split), offset, limit, origin=f"{key} {split}")
    found = find_data_dir(data_dir)
    if found is not None and (source == "local" or (found / key / f"{split}.jsonl").is_file()):
        return _window(_load_local(key, split, found), offset, limit, origin=f"{key} {split}")
    where = "no local data folder was found" if found is None else f"{found / key / split}.jsonl does not exist"
    if source == "local":
        raise ResidlabError(f"{key} {split} is not available locally: {where}.", hint=_NO_DATA_HINT)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ResidlabError(
            f"{key} {split} is not available: {where} and the `datasets` package is not installed.",
            hint=_NO_DATA_HINT,
        ) from None
    return _window(_load_hub(key, split), offset, limit, origin=f"{key} {split}")


# --------------------------------------------------------------------------- synthetic problems

_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "books")


def _sum(rng: random.Random, who: str, item: str) -> tuple[str, list[tuple[int, str, int, int]]]:
    a, b = rng.randint(2, 90), rng.randint(2, 90)
    question = f"{who} has {a} {item}. A friend gives {who} {b} more. How many {item} does {who} have now?"
    return question, [(a, "+", b, a + b)]


def _difference(rng: random.Random, who: str, item: str) -> tuple[str, list[tuple[int, str, int, int]]]:
    a = rng.randint(10, 120)
    b = rng.randint(1, a - 1)
    question = f"{who} had {a} {item} and gave {b} of them away. How many {item} does {who} have left?"
    return question, [(a, "-", b, a - b)]


def _product(rng: random.Random, who: str, item: str) -> tuple[str, list[tuple[int, str, int, int]]]:
    boxes, per_box = rng.randint(2, 12), rng.randint(2, 25)
    question = f"{who} buys {boxes} boxes of {item} with {per_box} {item} in each box. How many {item} is that in all?"
    return question, [(boxes, "*", per_box, boxes * per_box)]


def _half_as_many(rng: random.Random, who: str, item: str) -> tuple[str, list[tuple[int, str, int, int]]]:
    first = 2 * rng.randint(3, 60)
    half = first // 2
    question = (
        f"{who} collected {first} {item} on Monday and half as many on Tuesday. "
        f"How many {item} did {who} collect on the two days together?"
    )
    return question, [(first, "/", 2, half), (first, "+", half, first + half)]


def _unit_price(rng: random.Random, who: str, item: str) -> tuple[str, list[tuple[int, str, int, int]]]:
    count, price = rng.randint(2, 12), rng.randint(1, 9)
    cost = count * price
    bill = next(b for b in (10, 20, 50, 100, 200) if b >= cost)
    question = (
        f"{who} buys {count} {item} at ${price} each and pays with a ${bill} bill. "
        f"How much change, in dollars, does {who} get?"
    )
    return question, [(count, "*", price, cost), (bill, "-", cost, bill - cost)]


_TEMPLATES = {
    "sum": _sum,
    "difference": _difference,
    "product": _product,
    "half_as_many": _half_as_many,
    "unit_price": _unit_price,
}


def synthetic_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` tiny grade-school word problems with integer answers, deterministic for ``seed``.

    Each problem is drawn from its own seeded generator, so the first ``k`` problems of a seed are the
    same whatever ``n`` is. Solutions are equations, one step a line (``"48 / 2 = 24\\n48 + 24 = 72"``).
    """
    if n < 0:
        raise ResidlabError(f"cannot make {n} synthetic problems.", hint="ask for zero or more.")
    problems = []
    for index in range(n):
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
        rng = random.Random(f"residlab-synthetic-{seed}-{index}")
        template = rng.choice(sorted(_TEMPLATES))
        question, steps = _TEMPLATES[template](rng, rng.choice(_NAMES), rng.choice(_ITEMS))
        problems.append(
            Problem(
                id=f"synthetic-{index:05d}",
                question=question,
                answer=str(steps[-1][3]),
                solution="\n".join(f"{a} {op} {b} = {result}" for a, op, b, result in steps),
                dataset="synthetic",
                meta={"template": template, "seed": seed},
            )
        )
    return problems
