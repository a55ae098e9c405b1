"""Reading analysis texts from a file: one text per non-empty line, or a field of a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

from residlab.core.errors import ResidlabError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_FIELDS = ("question", "text", "prompt", "problem")


def read_texts(path: str | Path, *, limit: int | None = None, field: str | None = None) -> list[str]:
    """Texts to analyse from ``path``.

    A ``.jsonl``/``.ndjson`` file gives one text per record: the ``field`` given, else the first of
    ``question`` (GSM8K-style), ``text``, ``prompt``, ``problem`` that the first record has. Any
    other file gives one text per non-empty line. ``limit`` keeps the first texts.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ResidlabError(f"no text file at {path}.", hint="check the path given to --text-file.")
    if not path.is_file():
        raise ResidlabError(f"{path} is not a file.", hint="pass a text file (one text per line) or a .jsonl file.")
    if limit is not None and limit < 1:
        raise ResidlabError(f"limit must be at least 1, got {limit}.", hint="pass --limit 1 or more.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ResidlabError(f"{path} is not UTF-8 text ({err.reason}).", hint="pass a UTF-8 text file.") from None
    texts: list[str] = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        key = field
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ResidlabError(
                    f"{path}:{lineno} is not valid JSON ({err.msg}).",
                    hint="a .jsonl file needs one JSON object per line; rename it to .txt to read plain lines.",
                ) from None
            if not isinstance(row, dict):
                raise ResidlabError(f"{path}:{lineno} is not a JSON object.", hint="write one object per line.")
            if key is None:
                key = next((k for k in TEXT_FIELDS if k in row), None)
                if key is None:
                    raise ResidlabError(
                        f"{path}:{lineno} has none of the fields {', '.join(TEXT_FIELDS)} (it has {sorted(row)}).",
                        hint="name the field holding the text (field=...).",
                    )
            value = row.get(key)
            if not isinstance(value, str):
                raise ResidlabError(
                    f"{path}:{lineno} has no text field {key!r}.", hint="every record needs the same text field."
                )
            if value.strip():
                texts.append(value)
            if limit is not None and len(texts) >= limit:
                break
    else:
        for line in lines:
            if line.strip():
                texts.append(line)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ResidlabError(f"{path} holds no text.", hint="write one text per line (or a .jsonl with a 'question').")
    return texts
