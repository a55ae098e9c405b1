"""File checksums for caches that must not be trusted blindly: a full SHA-256, and a cheap sampled
digest (the size plus evenly spaced chunks, first and last included) that catches a zeroed,
truncated or overwritten file in milliseconds, for checks on every load."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BLOCK = 1 << 22
SAMPLE_CHUNKS = 64
SAMPLE_CHUNK_SIZE = 1 << 16


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sample_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the file size and ``SAMPLE_CHUNKS`` chunks at evenly spaced offsets (about 4 MB read)."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    span = max(0, size - SAMPLE_CHUNK_SIZE)
    with open(path, "rb") as fh:
        for i in range(SAMPLE_CHUNKS):
            fh.seek(span * i // (SAMPLE_CHUNKS - 1))
            digest.update(fh.read(SAMPLE_CHUNK_SIZE))
    return digest.hexdigest()


@dataclass(frozen=True)
class FileChecksum:
    """What a cache recorded about a file when it wrote it."""

    size: int
    sha256: str
    sample: str

    @classmethod
    def of(cls, path: str | os.PathLike[str], *, sha256: str | None = None) -> FileChecksum:
        """Checksums of ``path`` now (``sha256`` when already known, e.g. from a registry)."""
        return cls(Path(path).stat().st_size, sha256 or sha256_file(path), sample_digest(path))

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "sample": self.sample}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileChecksum:
        return cls(int(data["size"]), str(data["sha256"]), str(data["sample"]))

    def mismatch_size(self, path: str | os.PathLike[str]) -> str | None:
        """Why ``path`` cannot be the recorded file judging by its existence and size alone."""
        path = Path(path)
        if not path.is_file():
            return "the file is missing"
        size = path.stat().st_size
        return None if size == self.size else f"its size is {size} bytes, {self.size} were recorded"

    def mismatch(self, path: str | os.PathLike[str], *, full: bool = False) -> str | None:
        """Why ``path`` is not the file recorded (missing, size, sampled bytes or, with ``full``, the
        SHA-256), or ``None`` when it matches."""
        reason = self.mismatch_size(path)
        if reason is not None:
            return reason
        if sample_digest(path) != self.sample:
            return "its sampled bytes differ from those recorded when it was written"
        if full and sha256_file(path) != self.sha256:
            return "its SHA-256 differs from the one recorded when it was written"
        return None
