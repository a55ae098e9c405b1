"""What every benchmark records about where it ran: the commit of the checkout (scripts import it
as ``from provenance import commit``; running ``python benchmarks/X.py`` puts this folder on the path)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str:
    """The short hash of the checkout's HEAD, or ``unknown`` outside a git checkout."""
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, cwd=Path(__file__).parent, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
