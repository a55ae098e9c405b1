"""residlab's one I/O layer: crash-safe writes (a killed process never leaves a half-written file that
is later trusted), a NaN-safe JSON writer, and the strict reader for users' JSONL and text files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it onto ``target`` only if the body succeeds.

    The temporary lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    On any exception (or a kill) the target is untouched and the temporary is removed (or, after a
    kill, left with a ``.tmp-`` prefix that nothing reads).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def finite(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by ``None``, recursively (dataclasses, tuples and
    mappings included), so that what is written is standard JSON that any parser reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return finite(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(target: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically. NaN and infinities become ``null`` (bare ``NaN``
    is not JSON); objects JSON does not know are written as their ``str``."""
    text = json.dumps(finite(payload), indent=2, default=str, allow_nan=False)
    atomic_write_text(target, text + "\n")
    return Path(target)


def iter_jsonl(path: str | os.PathLike[str], *, what: str = "JSONL file") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for every non-blank line of a user's JSONL file, strictly.

    For files a person wrote: the last line counts whether or not it ends in a newline (residlab's own
    append-only records, where a kill can leave a torn last line, are read by
    :class:`~residlab.core.records.JsonlStore` instead). Every problem is reported as ``file:line``
    with one wording: a missing file, non-UTF-8 bytes, invalid JSON, a line that is not an object.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ResidlabError(
            f"no {what} at {path}." if not path.exists() else f"{path} is not a file.",
            hint="check the path (a file with one JSON object per line).",
        )
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ResidlabError(
                    f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start}).",
                    hint="save the file as UTF-8.",
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ResidlabError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}).",
                    hint="each line must be one JSON object; fix or delete that line.",
                ) from None
            if not isinstance(row, dict):
                raise ResidlabError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.",
                    hint='each line must be one JSON object, such as {"question": "..."}.',
                )
            yield lineno, row


def read_text_file(path: str | os.PathLike[str], *, what: str = "text file") -> str:
    """A user's UTF-8 text file, or a clear error naming what is wrong with it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ResidlabError(
            f"no {what} at {path}." if not path.exists() else f"{path} is not a file.", hint="check the path."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ResidlabError(f"{path} is not UTF-8 text ({err.reason}).", hint="save the file as UTF-8.") from None


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file (through links and relative parts)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_file(
    target: str | os.PathLike[str], *, inputs: tuple[str | os.PathLike[str], ...] = (), overwrite: bool = False
) -> Path:
    """``target`` as a file this command may write: never one of its ``inputs`` (that would destroy
    the only copy), not an existing file unless ``overwrite``, and in a folder that can be written."""
    target = Path(target).expanduser()
    for source in inputs:
        if same_file(source, target):
            raise ResidlabError(
                f"{target} is also the input file: writing it would destroy the only copy.",
                hint="write to another path.",
            )
    if target.is_dir():
        raise ResidlabError(f"{target} is a folder.", hint="give a file path to write.")
    if target.exists() and not overwrite:
        raise ResidlabError(f"{target} exists already.", hint="pass --force to replace it, or write elsewhere.")
    check_writable_dir(target.parent)
    return target


def check_writable_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if needed and prove it can be written (a file created and removed), so a
    long run fails before its first expensive step rather than after it."""
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".residlab-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ResidlabError(
            f"cannot write to {directory} ({err.strerror or err}).",
            hint="choose a folder you can write to (--work-dir / --out), or fix its permissions.",
        ) from None
    return directory
