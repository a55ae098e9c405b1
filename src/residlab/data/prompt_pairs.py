"""Clean / corrupted prompt pairs for activation patching: IOI, nation -> capital, or a user's JSONL file.

A :class:`PromptPair` holds a clean prompt, a corrupted prompt that differs in a few tokens, the answer
the clean prompt should continue with and the ``wrong`` answer the corrupted prompt points to. Patching
measures how much of the clean behaviour one component restores in the corrupted run.

- ``ioi``: indirect-object identification (Wang et al., 2022). ABBA and BABA templates ("When Mary and
  John went to the store, John gave a drink to" -> " Mary"); the answer is the indirect object, the wrong
  answer the subject. Corruptions: ``swap`` (the second subject mention becomes the indirect object, so
  the answer flips; the standard one) or ``abc`` (the two first names replaced by two other names).
- ``capitals``: ``CAPITAL_PROMPT`` of one country; corrupted with another country (answer and wrong are
  the two capitals).
- a JSONL file of ``{"clean", "corrupted", "answer", "wrong"}`` objects (strictly read: ``file:line`` errors).

The builders that take a tokenizer keep only what patching needs: names that are one token (with their
leading space) and corrupted prompts as long as their clean prompt in tokens.

Splits: ``split="eval"`` (the default) gives the pairs every report is measured on; ``split="train"``
gives pairs for choosing settings (RelP's default rules) that share nothing with the first
:data:`HELD_OUT_PAIRS` eval pairs of the same seed and tokenizer: no IOI prompt (clean or corrupted) in
common, no country (clean or corrupted) in common. Train pairs come from another random stream, and the
disjointness is enforced by rejection, not hoped for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl
from residlab.data.facts import CAPITAL_PROMPT, CAPITALS, Fact


@dataclass(frozen=True)
class PromptPair:
    """A clean prompt and its corrupted twin; ``answer`` / ``wrong`` are continuations (leading space kept)."""

    clean: str
    corrupted: str
    answer: str
    wrong: str


IOI_TEMPLATES_ABBA: tuple[str, ...] = (
    "When {A} and {B} went to the {place}, {B} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {B} decided to give it to",
    "After {A} and {B} went to the {place}, {B} gave a {object} to",
    "While {A} and {B} were working at the {place}, {B} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {B} gave a {object} to",
)
# BABA: the subject is named first; the indirect object is still the name mentioned once.
IOI_TEMPLATES_BABA: tuple[str, ...] = tuple(t.replace("{A} and {B}", "{B} and {A}", 1) for t in IOI_TEMPLATES_ABBA)
IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Kate", "Lisa", "Anna", "Mark",
    "David", "Sarah", "Emma", "Michael", "Laura", "Peter", "Chris", "Alice", "Bob", "Jack", "Rose", "Ben",
    "Sam", "Jane", "Luke", "Eric", "Adam", "Ryan", "Linda",
)  # fmt: skip
IOI_PLACES: tuple[str, ...] = ("store", "park", "school", "office", "house", "station", "garden", "hospital")
IOI_OBJECTS: tuple[str, ...] = ("drink", "book", "ring", "bone", "kiss", "snack", "letter", "ball")
IOI_CORRUPTIONS = ("swap", "abc")
PAIR_SPLITS = ("eval", "train")
HELD_OUT_PAIRS = 32  # train pairs share nothing with this many eval pairs (the reported runs use 16)
TRAIN_SEED_OFFSET = 1_000_003  # the train split's random stream: seed + this

TokenCount = Callable[[str], int]


def token_counter(tokenizer: Any) -> TokenCount:
    """``text -> number of tokens`` (no special tokens) for a Hugging Face tokenizer."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token_words(words: Sequence[str], count: TokenCount | None) -> list[str]:
    """The words that are one token with a leading space (all of them when ``count`` is None)."""
    return [w for w in words if count is None or count(" " + w) == 1]


def equal_length(pair: PromptPair, count: TokenCount | None) -> bool:
    """Whether the clean and corrupted prompts have as many tokens (always, without a tokenizer)."""
    return count is None or count(pair.clean) == count(pair.corrupted)


def ioi_pairs(
    n: int, *, tokenizer: Any = None, seed: int = 0, corruption: str = "swap", split: str = "eval"
) -> list[PromptPair]:
    """``n`` IOI pairs, ABBA and BABA templates alternating, names one token each for ``tokenizer``;
    ``split="train"``: pairs with no prompt in common with the first :data:`HELD_OUT_PAIRS` eval pairs."""
    taken: set[str] = set()
    if _check_split(split) == "train":
        held_out = ioi_pairs(HELD_OUT_PAIRS, tokenizer=tokenizer, seed=seed, corruption=corruption)
        taken = {text for pair in held_out for text in (pair.clean, pair.corrupted)}
        seed += TRAIN_SEED_OFFSET
    if corruption not in IOI_CORRUPTIONS:
        raise ResidlabError(f"unknown IOI corruption {corruption!r}.", hint=f"use one of {', '.join(IOI_CORRUPTIONS)}.")
    count = token_counter(tokenizer) if tokenizer is not None else None
    names = single_token_words(IOI_NAMES, count)
    places, objects = single_token_words(IOI_PLACES, count), single_token_words(IOI_OBJECTS, count)
    if len(names) < 4 or not places or not objects:
        raise ResidlabError(
            f"only {len(names)} IOI names ({len(places)} places, {len(objects)} objects) are single tokens "
            "for this tokenizer.",
            hint="use --dataset capitals or a JSONL file of pairs for this model.",
        )
    rng = random.Random(seed)
    pairs: list[PromptPair] = []
    for attempt in range(50 * n):
        if len(pairs) == n:
            break
        templates = IOI_TEMPLATES_ABBA if attempt % 2 == 0 else IOI_TEMPLATES_BABA
        template = templates[rng.randrange(len(templates))]
        a, b, c, d = rng.sample(names, 4)
        fill = dict(place=rng.choice(places), object=rng.choice(objects))
        clean = template.format(A=a, B=b, **fill)
        if corruption == "swap":  # the second mention of the subject becomes the indirect object
            head, tail = clean.rsplit(f" {b} ", 1)
            corrupted = f"{head} {a} {tail}"
        else:
            head, tail = template.format(A=c, B=d, **fill).rsplit(f" {d} ", 1)
            corrupted = f"{head} {b} {tail}"  # the first two names replaced, the subject's second mention kept
        pair = PromptPair(clean, corrupted, " " + a, " " + b)
        if equal_length(pair, count) and not {clean, corrupted} & taken:
            pairs.append(pair)
    return _enough(pairs, n, "IOI")


def capital_pairs(
    n: int | None = None, *, tokenizer: Any = None, seed: int = 0, split: str = "eval"
) -> list[PromptPair]:
    """Nation -> capital pairs from :data:`~residlab.data.facts.CAPITALS`: each country's prompt,
    corrupted with another country of the same token length (``n`` None: one pair per country);
    ``split="train"``: only countries that none of the first :data:`HELD_OUT_PAIRS` eval pairs uses."""
    facts = list(CAPITALS)
    if _check_split(split) == "train":
        held_out = _capital_pairs(facts, HELD_OUT_PAIRS, tokenizer, random.Random(seed))
        used = {subject for _, subjects in held_out for subject in subjects}
        facts = [f for f in facts if f.subject not in used]
        seed += TRAIN_SEED_OFFSET
    pairs = [pair for pair, _ in _capital_pairs(facts, n, tokenizer, random.Random(seed))]
    return _enough(pairs, n if n is not None else len(pairs), "capitals")


def _capital_pairs(
    facts: list[Fact], n: int | None, tokenizer: Any, rng: random.Random
) -> list[tuple[PromptPair, tuple[str, str]]]:
    """Up to ``n`` pairs from ``facts``, each with its (clean, corrupted) countries."""
    count = token_counter(tokenizer) if tokenizer is not None else None
    facts = list(facts)
    rng.shuffle(facts)
    pairs: list[tuple[PromptPair, tuple[str, str]]] = []
    for fact in facts:
        clean = CAPITAL_PROMPT.format(subject=fact.subject)
        others = [f for f in facts if f.subject != fact.subject]
        rng.shuffle(others)
        for other in others:
            pair = PromptPair(
                clean, CAPITAL_PROMPT.format(subject=other.subject), " " + fact.answer, " " + other.answer
            )
            if equal_length(pair, count) and _first_tokens_differ(pair, tokenizer):
                pairs.append((pair, (fact.subject, other.subject)))
                break
        if n is not None and len(pairs) == n:
            break
    return pairs


def _check_split(split: str) -> str:
    if split not in PAIR_SPLITS:
        raise ResidlabError(f"unknown prompt-pair split {split!r}.", hint=f"use one of {', '.join(PAIR_SPLITS)}.")
    return split


def _first_tokens_differ(pair: PromptPair, tokenizer: Any) -> bool:
    if tokenizer is None:
        return pair.answer != pair.wrong
    first = [tokenizer(t, add_special_tokens=False)["input_ids"][:1] for t in (pair.answer, pair.wrong)]
    return first[0] != first[1]


def _enough(pairs: list[PromptPair], n: int, what: str) -> list[PromptPair]:
    if len(pairs) < max(n, 1):
        raise ResidlabError(
            f"could build only {len(pairs)} of {n} {what} prompt pairs whose clean and corrupted prompts "
            "have as many tokens.",
            hint="ask for fewer pairs, or give a JSONL file of pairs.",
        )
    return pairs


PAIR_FIELDS = ("clean", "corrupted", "answer", "wrong")


def read_pairs(path: str | Path, *, limit: int | None = None) -> list[PromptPair]:
    """Prompt pairs from a JSONL file of ``{"clean", "corrupted", "answer", "wrong"}`` (non-empty strings)."""
    pairs = []
    for lineno, row in iter_jsonl(path, what="prompt-pair file"):
        missing = [f for f in PAIR_FIELDS if not isinstance(row.get(f), str) or not row[f]]
        if missing:
            raise ResidlabError(
                f"{path}:{lineno}: field(s) {', '.join(missing)} missing or not a non-empty string.",
                hint='each line needs {"clean": ..., "corrupted": ..., "answer": " Paris", "wrong": " Rome"}.',
            )
        pairs.append(PromptPair(*(row[f] for f in PAIR_FIELDS)))
        if limit is not None and len(pairs) == limit:
            break
    if not pairs:
        raise ResidlabError(f"{path} holds no prompt pairs.", hint="add one JSON object per line.")
    return pairs


PAIR_DATASETS = ("ioi", "capitals")


def load_pairs(
    dataset: str, *, n: int | None = None, tokenizer: Any = None, seed: int = 0, split: str = "eval"
) -> list[PromptPair]:
    """``ioi``, ``capitals`` or a JSONL file's path, cut to ``n`` pairs (IOI default: 32); ``split``
    picks the generated datasets' eval or (disjoint) train pairs; a file has no train split."""
    if dataset == "ioi":
        return ioi_pairs(n or 32, tokenizer=tokenizer, seed=seed, split=split)
    if dataset == "capitals":
        return capital_pairs(n, tokenizer=tokenizer, seed=seed, split=split)
    if _check_split(split) == "train":
        raise ResidlabError(
            f"a prompt-pair file ({dataset}) has no train split.", hint="split it into two files yourself."
        )
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ResidlabError(
            f"unknown prompt-pair dataset {dataset!r} (and no such file).",
            hint=f"use one of {', '.join(PAIR_DATASETS)}, or the path of a JSONL file of pairs.",
        )
    return read_pairs(path, limit=n)
