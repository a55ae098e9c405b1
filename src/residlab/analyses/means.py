"""Averages the analyses share: one running per-layer mean (or ratio of counts), and plain means of curves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class LayerMeans:
    """Running per-layer means, accumulated batch by batch: ``sum of values / number of values``.

    :meth:`add` counts every element of a tensor once (a mean over tokens); :meth:`add_sum` adds a
    precomputed sum and count (a fraction: hits over elements). A layer that saw nothing gives NaN.
    Sums are taken in float64, so the result does not depend on how the tokens were batched.
    """

    def __init__(self, num_layers: int) -> None:
        self.totals = [0.0] * num_layers
        self.counts = [0] * num_layers

    def add(self, layer: int, values: torch.Tensor) -> None:
        """Count every element of ``values`` once."""
        self.add_sum(layer, values.double().sum(), int(values.numel()))

    def add_sum(self, layer: int, total: float | torch.Tensor, count: int) -> None:
        """Add ``total``, the sum of ``count`` values (a number of hits, for a fraction)."""
        self.totals[layer] += float(total)
        self.counts[layer] += count

    def means(self) -> list[float]:
        """The mean per layer (NaN where nothing was added)."""
        return [t / c if c else float("nan") for t, c in zip(self.totals, self.counts, strict=True)]


def mean(values: Sequence[float]) -> float:
    """The plain mean of ``values`` (NaN for none)."""
    return sum(values) / len(values) if values else float("nan")


def halves(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean of the first and the second half of a per-layer curve (NaNs and Nones ignored)."""
    n = len(values)
    first = [v for v in values[: n // 2] if v is not None and math.isfinite(v)]
    second = [v for v in values[n // 2 :] if v is not None and math.isfinite(v)]
    return mean(first), mean(second)
