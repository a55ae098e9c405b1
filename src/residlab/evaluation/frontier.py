"""The accuracy-length frontier: conditions as points (mean tokens, accuracy) on the same problems, a
best-of-N shortest-correct oracle, one summary number per method, and the plot.

The summary number of a method (a group of points, e.g. one vector at several strengths) is the
share of the baseline's tokens it saves at its best point whose accuracy is within ``tolerance``
(2 points by default) of the baseline's, 0 when no point qualifies. Its 95% interval is a paired
bootstrap over problems: each resample recomputes every point's accuracy and tokens, picks the best
qualifying point again, and takes its saving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from residlab.core.plotting import pyplot, save_figure
from residlab.evaluation.records import EvalRecord

TOLERANCE = 0.02


@dataclass(frozen=True)
class FrontierPoint:
    """One condition on the problems of a frontier, in the frontier's problem order."""

    label: str
    correct: tuple[bool, ...]
    tokens: tuple[int, ...]

    @classmethod
    def from_records(cls, label: str, records: Sequence[EvalRecord]) -> FrontierPoint:
        return cls(label, tuple(bool(r.correct) for r in records), tuple(int(r.tokens) for r in records))

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else float("nan")

    @property
    def mean_tokens(self) -> float:
        return float(np.mean(self.tokens)) if self.tokens else float("nan")


@dataclass(frozen=True)
class TokensSaved:
    """A method's tokens saved at accuracy within ``tolerance`` of the baseline, with its bootstrap CI."""

    estimate: float  # share of the baseline's mean tokens saved (0: no point qualifies)
    ci95: tuple[float, float]
    best_point: str | None  # the qualifying point with the largest saving, on the full sample
    tolerance: float


def _best_saving(base_acc: np.ndarray, base_tok: np.ndarray, acc: np.ndarray, tok: np.ndarray, tolerance: float):
    """Per resample: the largest saving among qualifying points (arrays [samples] and [samples, points])."""
    saving = 1.0 - tok / base_tok[:, None]
    qualifies = acc >= base_acc[:, None] - tolerance - 1e-12
    return np.where(qualifies, saving, -np.inf).max(axis=1).clip(min=0.0)


def tokens_saved(
    baseline: FrontierPoint,
    points: Sequence[FrontierPoint],
    *,
    tolerance: float = TOLERANCE,
    samples: int = 2000,
    seed: int = 0,
) -> TokensSaved:
    """The summary number of ``points`` (one method) against ``baseline`` (see the module docstring)."""
    n = len(baseline.correct)
    if not points or n == 0 or any(len(p.correct) != n for p in points):
        raise ValueError("a frontier needs points on the baseline's problems")
    correct = np.array([p.correct for p in points], dtype=float)  # [points, n]
    tokens = np.array([p.tokens for p in points], dtype=float)
    base_c, base_t = np.array(baseline.correct, dtype=float), np.array(baseline.tokens, dtype=float)
    full = _best_saving(
        base_c.mean()[None], base_t.mean()[None], correct.mean(1)[None], tokens.mean(1)[None], tolerance
    )
    index = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    boot = _best_saving(
        base_c[index].mean(1), base_t[index].mean(1), correct[:, index].mean(2).T, tokens[:, index].mean(2).T, tolerance
    )
    savings = 1.0 - tokens.mean(1) / base_t.mean()
    qualifying = [i for i in range(len(points)) if correct[i].mean() >= base_c.mean() - tolerance - 1e-12]
    best = max(qualifying, key=lambda i: savings[i]) if qualifying else None
    return TokensSaved(
        estimate=float(full[0]),
        ci95=(float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))),
        best_point=points[best].label if best is not None and savings[best] > 0 else None,
        tolerance=tolerance,
    )


def shortest_correct_oracle(
    baseline: Sequence[EvalRecord], samples: Mapping[str, Sequence[EvalRecord]], label: str = "best-of-N oracle"
) -> FrontierPoint:
    """Per problem, the shortest correct of the baseline and its samples (``samples``: id -> records;
    a problem none of them solves keeps the baseline's record): the model's own shortest correct trace."""
    correct, tokens = [], []
    for record in baseline:
        candidates = [record, *samples.get(record.id, ())]
        best = min(candidates, key=lambda r: (not r.solved, r.tokens if r.solved else 0))
        chosen = best if best.solved else record
        correct.append(bool(chosen.correct))
        tokens.append(int(chosen.tokens))
    return FrontierPoint(label, tuple(correct), tuple(tokens))


def plot_frontier(
    methods: Mapping[str, Sequence[tuple[float, float, str]]],
    references: Mapping[str, tuple[float, float]],
    path: str | Path,
    title: str,
) -> Path:
    """Accuracy vs mean tokens: one line per method (points (tokens, accuracy, label), e.g. strengths)
    and one marker per reference (the baseline, prompt baselines, an oracle)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, points in methods.items():
        ordered = sorted(points, key=lambda p: p[0])
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "o-", label=name)
        for x, y, text in ordered:
            if text:
                ax.annotate(text, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    markers = iter("*sDP^vX")
    for name, (x, y) in references.items():
        ax.plot([x], [y], next(markers, "x"), markersize=10, label=name, linestyle="none")
    ax.set_xlabel("mean generated tokens")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
