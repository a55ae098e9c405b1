"""Where residlab keeps what it downloads and converts (override with ``RESIDLAB_CACHE``)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The root cache directory: ``$RESIDLAB_CACHE`` or the platform's user cache dir."""
    env = os.environ.get("RESIDLAB_CACHE")
    root = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("residlab"))
    root.mkdir(parents=True, exist_ok=True)
    return root
