"""Reading texts from a user's file: one text per non-empty line, or a field of a JSONL file."""

from __future__ import annotations

from pathlib import Path

from residlab.core.errors import ResidlabError
from residlab.core.io import iter_jsonl, read_text_file

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_FIELDS = ("question", "text", "prompt", "problem")


def read_texts(path: str | Path, *, limit: int | None = None, field: str | None = None) -> list[str]:
    """Texts from ``path``.

    A ``.jsonl``/``.ndjson`` file gives one text per record: the ``field`` given, else the first of
    ``question`` (GSM8K-style), ``text``, ``prompt``, ``problem`` that the first record has. Any
    other file gives one text per non-empty line. ``limit`` keeps the first texts.
    """
    path = Path(path).expanduser()
    if limit is not None and limit < 1:
        raise ResidlabError(f"limit must be at least 1, got {limit}.", hint="pass --limit 1 or more.")
    texts: list[str] = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        key = field
        for lineno, row in iter_jsonl(path, what="text file"):
            if key is None:
                key = next((k for k in TEXT_FIELDS if k in row), None)
                if key is None:
                    raise ResidlabError(
                        f"{path}:{lineno}: none of the fields {', '.join(TEXT_FIELDS)} (it has {sorted(row)}).",
                        hint="name the field holding the text (field=...).",
                    )
            value = row.get(key)
            if not isinstance(value, str):
                raise ResidlabError(
                    f"{path}:{lineno}: no text field {key!r}.", hint="every record needs the same text field."
                )
            if value.strip():
                texts.append(value)
            if limit is not None and len(texts) >= limit:
                break
    else:
        for line in read_text_file(path, what="text file").splitlines():
            if line.strip():
                texts.append(line)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ResidlabError(f"{path} holds no text.", hint="write one text per line (or a .jsonl with a 'question').")
    return texts
