"""Append-only JSONL records that survive a kill and concurrent writers: resume reads what is
complete and goes on; two runs on one file share it instead of corrupting it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from residlab.core.errors import ResidlabError


class JsonlStore:
    """One JSON object per line, appended and fsynced in batches.

    A kill can leave at most a partial last line (no newline, or a tail of NUL bytes that some file
    systems leave after a crash); :meth:`read` ignores it and the next :meth:`append` cuts it off
    first, so nothing is lost or duplicated. A broken line anywhere else means the file was edited
    or damaged: that is reported with its line number.

    Writers take an exclusive lock on the file (``flock``) for the whole read-check-append step, so
    several processes can append to one store at once: none of them tears another's line, and with
    ``unique_key`` (a field name, default ``"id"``, or a function of the record) a record whose key is
    already stored is not stored again, so two identical runs share one file without duplicates.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, unique_key: str | Callable[[dict[str, Any]], Hashable] | None = "id"
    ) -> None:
        self.path = Path(path)
        self.unique_key = unique_key

    def _key(self, record: dict[str, Any]) -> Hashable | None:
        """The record's unique key (a field's value, or what the key function makes of it)."""
        if self.unique_key is None:
            return None
        if callable(self.unique_key):
            return self.unique_key(record)
        return record.get(self.unique_key)

    def _scan(self, data: bytes) -> tuple[list[dict[str, Any]], int]:
        """(complete records, byte length of the complete part) of the file's bytes."""
        records: list[dict[str, Any]] = []
        good = 0
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if number == len(lines):  # bytes after the final newline: a partial record from a kill, or nothing
                break
            if not raw.strip(b"\x00"):  # a line of NULs from a crash: nothing was written there
                if number == len(lines) - 1 or not any(x.strip(b"\x00 \t\r") for x in lines[number:]):
                    break  # a NUL tail: the torn end of the file
            if raw.strip():
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                except ValueError as err:
                    raise ResidlabError(
                        f"{self.path}:{number}: not a JSON record ({err}).",
                        hint="the file was edited or damaged; fix or delete that line (or the file) and rerun.",
                    ) from None
                records.append(record)
            good += len(raw) + 1
        return records, good

    def read(self) -> list[dict[str, Any]]:
        """Every complete record, in file order."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh, _locked(fh, shared=True):
            return self._scan(fh.read())[0]

    def append(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append ``records`` (cutting off a torn tail first) and return what the store now holds for
        them: with ``unique_key``, a record whose key another writer stored first is not written, and
        the stored one is returned in its place."""
        fresh = list(records)
        if not fresh:
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh, _locked(fh, shared=False):
            fh.seek(0)
            existing, good = self._scan(fh.read())
            stored = {key: r for r in existing if (key := self._key(r)) is not None}
            result, lines = [], []
            for record in fresh:
                key = self._key(record)
                if key is not None and key in stored:
                    result.append(stored[key])
                    continue
                if key is not None:
                    stored[key] = record
                result.append(record)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            fh.seek(0, os.SEEK_END)
            if fh.tell() != good:
                fh.truncate(good)  # drop a partial line left by a kill
            if lines:
                fh.seek(good)
                fh.write("".join(lines).encode())
                fh.flush()
                os.fsync(fh.fileno())
        return result


@contextlib.contextmanager
def _locked(fh: IO[bytes], *, shared: bool) -> Iterator[None]:
    """An advisory whole-file lock held for the block (shared for readers, exclusive for writers)."""
    fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class WorkClaims:
    """Claims on pieces of work that several processes may start at once (the batches of one store's
    records): a claim is a one-byte ``fcntl`` record lock in a ``.claims`` file beside the store, at an
    offset derived from the piece's key. The kernel drops a dead process's locks, so a killed run
    never leaves a stale claim. Locks are per process: threads of one process do not exclude each other.

    Use it as a context manager (it holds the file open: closing any descriptor of the file would drop
    the process's claims); :meth:`try_claim` does not wait, :meth:`claim` waits for the holder.
    """

    _SLOTS = 2**31 - 1  # offsets a key can map to; two keys sharing one only serialise their work

    def __init__(self, store_path: str | os.PathLike[str]) -> None:
        self.path = Path(store_path).with_suffix(".claims")
        self._fh: IO[bytes] | None = None

    def __enter__(self) -> WorkClaims:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()  # releases every claim still held
            self._fh = None

    def _offset(self, key: str) -> int:
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % self._SLOTS

    def _lock(self, key: str, flags: int) -> None:
        if self._fh is None:
            raise RuntimeError("WorkClaims is used outside its `with` block")
        try:
            fcntl.lockf(self._fh.fileno(), flags, 1, self._offset(key))
        except OSError as exc:
            # A file system without record locks (some network mounts): claims only save duplicate work,
            # the store itself still keeps one record per key, so go on without them.
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def try_claim(self, key: str) -> bool:
        """Claim ``key`` if no other process holds it; ``False`` (without waiting) if one does."""
        try:
            self._lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def claim(self, key: str) -> None:
        """Claim ``key``, waiting until the process holding it releases it (or dies)."""
        self._lock(key, fcntl.LOCK_EX)

    def release(self, key: str) -> None:
        """Give ``key`` back."""
        self._lock(key, fcntl.LOCK_UN)
