"""Append-only JSONL records that survive a kill: resume reads what is complete and goes on."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError


class JsonlStore:
    """One JSON object per line, appended and fsynced in batches.

    A kill can leave at most a partial last line (no newline); :meth:`read` ignores it and the next
    :meth:`append` cuts it off first, so nothing is lost or duplicated. A broken line anywhere else
    means the file was edited or damaged: that is reported with its line number.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _scan(self) -> tuple[list[dict[str, Any]], int]:
        """(complete records, byte length of the complete part)."""
        if not self.path.exists():
            return [], 0
        data = self.path.read_bytes()
        records: list[dict[str, Any]] = []
        good = 0
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            is_last = number == len(lines)
            if is_last:  # bytes after the final newline: a partial record from a kill, or nothing
                break
            if raw.strip():
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                except ValueError as err:
                    raise ResidlabError(
                        f"{self.path}, line {number}: not a JSON record ({err}).",
                        hint="the file was edited or damaged; fix or delete that line (or the file) and rerun.",
                    ) from None
                records.append(record)
            good += len(raw) + 1
        return records, good

    def read(self) -> list[dict[str, Any]]:
        return self._scan()[0]

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, good = self._scan()
        with open(self.path, "ab") as fh:
            if fh.tell() != good:
                fh.truncate(good)  # drop a partial line left by a kill
            fh.write(lines.encode())
            fh.flush()
            os.fsync(fh.fileno())
