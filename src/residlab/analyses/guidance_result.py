"""The guidance experiment's records: one :class:`RunCurve` per (condition, seed) and the :class:`GuidanceResult`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from residlab.analyses.result import AnalysisResult, figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class RunCurve:
    """One training run's held-out curves, measured at ``steps`` (step 0 = the initial weights)."""

    condition: str
    seed: int
    steps: list[int]
    train_loss: list[float | None]  # mean task loss since the previous measurement (None at step 0)
    guidance_loss: list[float | None]  # mean guidance term since the previous measurement
    eval_ce: list[float]
    cka_biased: list[list[float]]  # [measurement][target layer], against the trained guide
    cka_debiased: list[list[float]]
    seconds: float = 0.0

    @classmethod
    def start(cls, condition: str, seed: int, ce: float, biased: list[float], debiased: list[float]) -> RunCurve:
        """A curve holding the measurement of the initial weights."""
        return cls(condition, seed, [0], [None], [None], [ce], [biased], [debiased])

    def add(self, step: int, train: float, guide: float, ce: float, biased: list[float], debiased: list[float]) -> None:
        """Append one measurement."""
        self.steps.append(step)
        self.train_loss.append(train)
        self.guidance_loss.append(guide if self.condition != "baseline" else None)
        self.eval_ce.append(ce)
        self.cka_biased.append(biased)
        self.cka_debiased.append(debiased)

    def finished(self, seconds: float) -> RunCurve:
        """Record the run's wall-clock time and return it."""
        self.seconds = seconds
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunCurve:
        """A curve from its JSON form."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")


def _training_mean(run: RunCurve) -> float:
    """Mean held-out CE over the measurements after step 0 (the area under the curve, per measurement)."""
    later = run.eval_ce[1:] or run.eval_ce
    return sum(later) / len(later)


def _first_step_at_most(run: RunCurve, level: float) -> int | None:
    """The first measured step whose held-out CE is <= ``level`` (None if none is)."""
    return next((step for step, ce in zip(run.steps, run.eval_ce, strict=True) if ce <= level), None)


@dataclass(frozen=True)
class GuidanceResult(AnalysisResult):
    """Every run of a guidance experiment and how the guided conditions compare with the baseline."""

    json_file: ClassVar[str] = "guidance.json"

    config: dict[str, Any]
    guide: str
    guide_layers: list[int]
    train_tokens: int
    eval_tokens: int
    eval_coverage: float
    runs: list[RunCurve]
    notes: list[str] = field(default_factory=list)

    def _by(self, condition: str) -> dict[int, RunCurve]:
        return {r.seed: r for r in self.runs if r.condition == condition}

    def summary(self) -> dict[str, Any]:
        """Final, best and mean-over-training held-out CE per condition (mean, sd over seeds), final CKA
        with the guide, and each guided condition's paired differences from the baseline (negative =
        guidance helps) with, per seed, the first step at which it reaches the baseline's final CE."""
        out: dict[str, Any] = {}
        conditions = list(dict.fromkeys(r.condition for r in self.runs))
        for condition in conditions:
            runs = list(self._by(condition).values())
            out[f"{condition}_final_ce"], out[f"{condition}_final_ce_sd"] = _mean_sd([r.eval_ce[-1] for r in runs])
            out[f"{condition}_best_ce"] = _mean_sd([min(r.eval_ce) for r in runs])[0]
            out[f"{condition}_mean_ce_over_training"] = _mean_sd([_training_mean(r) for r in runs])[0]
            layers = len(runs[0].cka_debiased[-1])
            out[f"{condition}_final_cka_debiased"] = [
                _mean_sd([r.cka_debiased[-1][i] for r in runs])[0] for i in range(layers)
            ]
            out[f"{condition}_final_cka_biased"] = [
                _mean_sd([r.cka_biased[-1][i] for r in runs])[0] for i in range(layers)
            ]
        base = self._by("baseline")
        for condition in conditions:
            if condition == "baseline" or not base:
                continue
            mine = self._by(condition)
            seeds = sorted(set(base) & set(mine))
            deltas = [mine[s].eval_ce[-1] - base[s].eval_ce[-1] for s in seeds]
            best = [min(mine[s].eval_ce) - min(base[s].eval_ce) for s in seeds]
            if deltas:
                out[f"{condition}_minus_baseline_final_ce"], out[f"{condition}_minus_baseline_sd"] = _mean_sd(deltas)
                out[f"{condition}_minus_baseline_best_ce"] = _mean_sd(best)[0]
                over = [_training_mean(mine[s]) - _training_mean(base[s]) for s in seeds]
                out[f"{condition}_minus_baseline_mean_ce_over_training"] = _mean_sd(over)[0]
                reach = [_first_step_at_most(mine[s], base[s].eval_ce[-1]) for s in seeds]
                out[f"{condition}_steps_to_baseline_final_ce"] = reach
                out[f"{condition}_seeds_better"] = sum(d < 0 for d in deltas)
                out[f"{condition}_helps"] = all(d < 0 for d in deltas)
        out["num_seeds"] = len(base) if base else len({r.seed for r in self.runs})
        return out

    @figure("guidance_loss.png")
    def _loss(self, plt: Any) -> Figure:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        colours: dict[str, str] = {}
        for run in self.runs:
            colour = colours.setdefault(run.condition, f"C{len(colours)}")
            label = (
                run.condition
                if sum(r.condition == run.condition for r in self.runs[: self.runs.index(run)]) == 0
                else None
            )
            ax.plot(run.steps, run.eval_ce, "-", color=colour, lw=1.2, alpha=0.8, label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out cross-entropy (nats/token)")
        ax.set_title(f"{self.config['target']} target, guide {self.guide} (one line per seed)", fontsize=10)
        ax.set_ylim(top=min(max(max(r.eval_ce[1:] or r.eval_ce) for r in self.runs) * 1.05, 12))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    @figure("guidance_cka.png")
    def _cka(self, plt: Any) -> Figure:
        layers = len(self.runs[0].cka_debiased[0])
        fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3.6), squeeze=False)
        colours: dict[str, str] = {}
        for run in self.runs:
            colour = colours.setdefault(run.condition, f"C{len(colours)}")
            for i, ax in enumerate(axes[0]):
                ax.plot(run.steps, [m[i] for m in run.cka_debiased], "-", color=colour, lw=1, alpha=0.8)
        for i, ax in enumerate(axes[0]):
            ax.set_title(f"target layer {i} vs guide layer {self.guide_layers[i]}", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("debiased CKA (held-out tokens)")
            ax.grid(alpha=0.3)
        for condition, colour in colours.items():
            axes[0][0].plot([], [], color=colour, label=condition)
        axes[0][0].legend(fontsize=8)
        return fig
