"""Contrast pairs: a positive and a negative example to extract a steering direction from.

Each side is a text (read as written) or a chat (messages, rendered through the model's chat template;
a final assistant message is left open, so its last token is the last word written, not an end-of-turn
marker). With a ``prompt``, both sides are completions of it: the prompt is rendered once (through the
chat template with the generation prompt when ``chat``) and read positions count the completion's tokens.

A pairs file is JSONL, one pair per line::

    {"positive": "I love this film.", "negative": "I hate this film."}
    {"prompt": "Review the film.", "positive": "A joy.", "negative": "A bore.", "read": "mean"}
    {"positive": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, friend!"}],
     "negative": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "What now?"}]}

Other keys (an ``id``, a label) are ignored. ``read`` (optional) overrides the call's read position
for that pair: ``last``, ``mean``, a token index, or a span ``start:stop`` (see
:class:`~residlab.recipes.extraction.ReadPosition`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.core.generation import Prompt
from residlab.core.io import iter_jsonl

Messages = Sequence[Mapping[str, str]]
ReadSpec = str | int | Sequence[int]  # last | mean | first:N | start:stop | an index | [start, stop]


@dataclass(frozen=True)
class ContrastPair:
    """One contrast: ``positive`` and ``negative`` (texts or chats), optionally completions of ``prompt``,
    read at ``read`` (``None``: the extraction's default)."""

    positive: Prompt
    negative: Prompt
    prompt: Prompt | None = None
    read: ReadSpec | None = None

    def __post_init__(self) -> None:
        for side in ("positive", "negative"):
            value = getattr(self, side)
            _check_example(value, side)
            if self.prompt is not None and not isinstance(value, str):
                raise ResidlabError(
                    f"with a prompt, the {side} side must be a text (its completion), not chat messages.",
                    hint="put the whole conversation in positive/negative and drop the prompt, or give texts.",
                )
        if self.prompt is not None:
            _check_example(self.prompt, "prompt")


def _check_example(value: Any, what: str) -> None:
    if isinstance(value, str):
        if not value:
            raise ResidlabError(f"the {what} text is empty.", hint="give a non-empty text.")
        return
    if not isinstance(value, Sequence) or not value:
        raise ResidlabError(
            f"the {what} side is {type(value).__name__}; expected a text or a list of chat messages.",
            hint='use "text", or [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].',
        )
    for message in value:
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
            raise ResidlabError(
                f"the {what} side has a message without a role: {message!r}.",
                hint='each message is {"role": "user" | "assistant" | "system", "content": "..."}.',
            )
        if not isinstance(message.get("content"), str):
            raise ResidlabError(
                f"the {what} side has a message without text content: {message!r}.",
                hint='each chat message needs {"role": ..., "content": "text"}.',
            )


def as_pairs(pairs: Iterable[ContrastPair | Sequence[Prompt] | Mapping[str, Any]]) -> list[ContrastPair]:
    """Pairs given as :class:`ContrastPair`, ``(positive, negative)`` tuples or mappings with the file's keys."""
    out = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, ContrastPair):
            out.append(pair)
        elif isinstance(pair, Mapping):
            out.append(_from_mapping(pair, f"pair {index}"))
        elif isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
            out.append(ContrastPair(pair[0], pair[1]))
        else:
            raise ResidlabError(
                f"pair {index} is {type(pair).__name__}; expected (positive, negative), a ContrastPair or a mapping.",
                hint='give pairs such as ("I love it.", "I hate it.").',
            )
    if not out:
        raise ResidlabError("no contrast pairs were given.", hint="give at least one (positive, negative) pair.")
    return out


def _from_mapping(row: Mapping[str, Any], where: str) -> ContrastPair:
    missing = [key for key in ("positive", "negative") if key not in row]
    if missing:
        raise ResidlabError(
            f"{where}: no {' or '.join(missing)} field.",
            hint='each pair needs "positive" and "negative" (texts or chat messages); "prompt" and "read" '
            "are optional.",
        )
    try:
        return ContrastPair(row["positive"], row["negative"], row.get("prompt"), row.get("read"))
    except ResidlabError as err:
        raise ResidlabError(f"{where}: {err.message}", hint=err.hint) from None


def read_pairs(path: str | os.PathLike[str]) -> list[ContrastPair]:
    """The pairs of a JSONL file (see the module docstring); errors name ``file:line``."""
    pairs = [_from_mapping(row, f"{path}:{lineno}") for lineno, row in iter_jsonl(path, what="pairs file")]
    if not pairs:
        raise ResidlabError(f"{path} holds no pairs.", hint='write one {"positive": ..., "negative": ...} per line.')
    return pairs
