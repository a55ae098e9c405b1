"""Confidence intervals and paired tests for comparing generation conditions on the same problems."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0 and n, unlike the normal one)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a right & b wrong, and vice versa)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_mean_difference(
    a: Sequence[float], b: Sequence[float], *, samples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Paired bootstrap of mean(b - a): (estimate, low, high) at 95%, resampling problems."""
    x = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(samples, x.size))
    means = x[idx].mean(axis=1)
    return (float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


@dataclass(frozen=True)
class PairedComparison:
    """Condition B against condition A on the same problems."""

    n: int
    accuracy_difference: float  # B - A
    accuracy_difference_ci95: tuple[float, float]
    a_only_correct: int
    b_only_correct: int
    mcnemar_p: float
    token_ratio: float  # mean tokens B / mean tokens A

    @property
    def significantly_lower(self) -> bool:
        return self.mcnemar_p < 0.05 and self.accuracy_difference < 0


def compare_paired(
    correct_a: Sequence[bool], correct_b: Sequence[bool], tokens_a: Sequence[int], tokens_b: Sequence[int]
) -> PairedComparison:
    """Paired statistics of B vs A (same problems, same order)."""
    if len(correct_a) != len(correct_b):
        raise ValueError("paired comparison needs the same problems in both conditions")
    a_only = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    diff, low, high = bootstrap_mean_difference([float(x) for x in correct_a], [float(y) for y in correct_b])
    mean_a = float(np.mean(tokens_a)) if len(tokens_a) else math.nan
    mean_b = float(np.mean(tokens_b)) if len(tokens_b) else math.nan
    return PairedComparison(
        n=len(correct_a),
        accuracy_difference=diff,
        accuracy_difference_ci95=(low, high),
        a_only_correct=a_only,
        b_only_correct=b_only,
        mcnemar_p=mcnemar_exact(a_only, b_only),
        token_ratio=mean_b / mean_a if mean_a else math.nan,
    )
