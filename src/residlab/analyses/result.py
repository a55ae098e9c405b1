"""What every analysis result shares: ``to_dict()``, ``plot(out_dir)`` and ``save(out_dir)``.

A result is a dataclass that subclasses :class:`AnalysisResult` and declares only what is its own::

    @dataclass(frozen=True)
    class CkaResult(AnalysisResult):
        json_file: ClassVar[str] = "cka.json"
        model: str
        similarity: list[list[float]]

        def summary(self) -> dict[str, Any]:
            return {"mean_similarity": ...}

        @figure("cka_matrix.png")
        def _matrix(self, plt) -> Figure:
            fig, ax = plt.subplots()
            ...
            return fig

``save`` then writes ``cka.json`` (the fields, any :meth:`~AnalysisResult.derived` values and the
summary, NaN as ``null``) and every figure, in the order the class defines them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from residlab.core.io import write_json
from residlab.core.plotting import pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DrawMethod = TypeVar("DrawMethod", bound=Callable[..., "Figure | None"])
_FIGURE_FILE = "_residlab_figure_file"  # the attribute @figure leaves on a drawing method


def figure(file_name: str) -> Callable[[DrawMethod], DrawMethod]:
    """Mark a result method ``draw(self, plt) -> Figure | None`` as the figure saved as ``file_name``.

    ``plt`` is :func:`~residlab.core.plotting.pyplot`'s module; returning ``None`` leaves the figure
    out (for data the result may lack, such as an optional measurement).
    """

    def mark(draw: DrawMethod) -> DrawMethod:
        setattr(draw, _FIGURE_FILE, file_name)
        return draw

    return mark


class AnalysisResult(ABC):
    """Base of the analyses' result dataclasses (see the module docstring)."""

    json_file: ClassVar[str]  # what save() names the JSON file, e.g. "depth.json"
    figures: ClassVar[dict[str, str]] = {}  # drawing method name -> PNG file name, in definition order

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = {name: getattr(f, _FIGURE_FILE) for name, f in vars(cls).items() if hasattr(f, _FIGURE_FILE)}
        cls.figures = {**cls.figures, **own}  # a parent's figures first; an override keeps its place

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """The headline numbers (written under ``"summary"`` in the JSON file)."""

    def derived(self) -> dict[str, Any]:
        """Values computed from the fields that the JSON file holds too, after the fields (none here)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The fields, then :meth:`derived`, then ``"summary"``: the JSON file's content (NaN kept as NaN)."""
        return {**asdict(self), **self.derived(), "summary": self.summary()}  # type: ignore[call-overload]

    def plot(self, out_dir: str | Path) -> list[Path]:
        """Draw every figure of the class into ``out_dir`` as PNGs; return their paths."""
        out = Path(out_dir)
        plt = pyplot()
        paths = []
        for method, file_name in self.figures.items():
            drawn = getattr(self, method)(plt)
            if drawn is not None:
                paths.append(save_figure(drawn, out / file_name))
        return paths

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write the JSON file (NaN as ``null``) and the figures into ``out_dir``; return every path written."""
        out = Path(out_dir)
        return [write_json(out / self.json_file, self.to_dict()), *self.plot(out)]
