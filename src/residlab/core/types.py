"""Small shared types: the shape of a model as files and checks need it, and the log callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Log = Callable[[str], None]  # where progress messages go (print, a rich console, or nothing)


class ModelShape(Protocol):
    """What a vector or file check needs to know of a model: a LanguageModel, an engine, or the
    metadata of a model on disk all satisfy it."""

    @property
    def name(self) -> str: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...


def check_layer_index(layer: int, num_layers: int, model_name: str = "the model") -> int:
    """``layer`` (negative counts from the end) as a block index in ``0..num_layers-1``, or a clear error."""
    from residlab.core.errors import ResidlabError

    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise ResidlabError(
            f"layer {layer} does not exist: {model_name} has {num_layers} blocks (0..{num_layers - 1}).",
            hint="layer i is the output of decoder block i, 0-based (counted back from the end when negative).",
        )
    return index


def finite_number(value: object, name: str = "strength") -> float:
    """``value`` as a finite float, or a clear error (NaN or infinity would silently empty every output)."""
    import math

    from residlab.core.errors import ResidlabError

    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ResidlabError(
            f"{name} must be a number, got {value!r}.", hint=f"pass a finite number as {name}."
        ) from None
    if not math.isfinite(number):
        raise ResidlabError(f"{name} must be finite, got {number}.", hint=f"pass a finite number as {name}.")
    return number
