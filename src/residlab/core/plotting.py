"""Figures: a headless matplotlib and one atomic PNG saver for every report and analysis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from residlab.core.io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it as a PNG atomically (a kill never leaves half an image) and close it."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
