"""Summaries, paired comparisons, tables and plots of evaluation records."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from residlab.core.plotting import pyplot, save_figure
from residlab.evaluation.records import EvalRecord
from residlab.evaluation.stats import PairedComparison, compare_paired, wilson_interval


@dataclass(frozen=True)
class ConditionSummary:
    name: str
    n: int
    accuracy: float
    accuracy_ci95: tuple[float, float]
    mean_tokens: float
    median_tokens: float
    cut_off_share: float  # outputs stopped by the token budget
    seconds_per_problem: float
    extraction_rules: dict[str, int]


def summarize(name: str, records: Sequence[EvalRecord]) -> ConditionSummary:
    """Accuracy (with its Wilson interval), token counts, cut-offs and time of one condition's records."""
    n = len(records)
    correct = sum(r.correct for r in records)
    tokens = [r.tokens for r in records]
    return ConditionSummary(
        name=name,
        n=n,
        accuracy=correct / n if n else float("nan"),
        accuracy_ci95=wilson_interval(correct, n),
        mean_tokens=statistics.fmean(tokens) if tokens else float("nan"),
        median_tokens=statistics.median(tokens) if tokens else float("nan"),
        cut_off_share=sum(r.hit_limit for r in records) / n if n else float("nan"),
        seconds_per_problem=statistics.fmean(r.seconds for r in records) if n else float("nan"),
        extraction_rules=dict(Counter(r.rule for r in records)),
    )


# A condition with at least this share of answers stopped by the token budget gets a warning: their grades
# and lengths are cut short (a reasoning model's traces run to thousands of tokens).
CUT_OFF_WARNING_SHARE = 0.1


def cut_off_warning(summary: ConditionSummary, max_new_tokens: int) -> str | None:
    """A ``warning:`` + ``hint:`` message when ``summary``'s answers often hit ``max_new_tokens``, else None."""
    if not summary.cut_off_share >= CUT_OFF_WARNING_SHARE:  # also None for an empty (NaN) summary
        return None
    stopped = round(summary.cut_off_share * summary.n)
    return (
        f"warning: {summary.cut_off_share:.0%} of the {summary.name} answers ({stopped} of {summary.n}) stopped "
        f"at {max_new_tokens} new tokens, so their accuracy and token counts are cut short.\n"
        "hint: raise --max-new-tokens (reasoning models write 1,000-4,000 tokens a problem); a new limit generates "
        "new records, the ones already written stay for this one."
    )


def compare(base: Sequence[EvalRecord], other: Sequence[EvalRecord]) -> PairedComparison:
    """Paired comparison of two conditions' records on the same problems, in the same order."""
    return compare_paired(
        [r.correct for r in base],
        [r.correct for r in other],
        [r.tokens for r in base],
        [r.tokens for r in other],
    )


def comparison_dict(base: ConditionSummary, other: ConditionSummary, paired: PairedComparison) -> dict[str, Any]:
    return {
        "token_reduction": 1 - other.mean_tokens / base.mean_tokens if base.mean_tokens else float("nan"),
        "speedup": base.seconds_per_problem / other.seconds_per_problem if other.seconds_per_problem else float("nan"),
        **asdict(paired),
        "significantly_lower": paired.significantly_lower,
    }


def markdown_table(summaries: Sequence[ConditionSummary], baseline: str = "baseline") -> str:
    base = next((s for s in summaries if s.name == baseline), summaries[0])
    lines = [
        "| condition | n | accuracy (95% CI) | mean tokens | median tokens | reduction | cut off | s/problem "
        "| speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        low, high = s.accuracy_ci95
        reduction = 1 - s.mean_tokens / base.mean_tokens
        speedup = base.seconds_per_problem / s.seconds_per_problem
        lines.append(
            f"| {s.name} | {s.n} | {s.accuracy:.1%} ({low:.1%}-{high:.1%}) | {s.mean_tokens:.0f} | "
            f"{s.median_tokens:.0f} | {reduction:+.1%} | {s.cut_off_share:.1%} | {s.seconds_per_problem:.2f} | "
            f"{speedup:.2f}x |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_tokens(points: Sequence[tuple[str, ConditionSummary]], path: Path, title: str) -> Path:
    """One point per (label, summary), with the accuracy CI as error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, s in points:
        low, high = s.accuracy_ci95
        ax.errorbar(s.mean_tokens, s.accuracy, yerr=[[s.accuracy - low], [high - s.accuracy]], fmt="o", capsize=3)
        ax.annotate(label, (s.mean_tokens, s.accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("mean generated tokens")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_token_histograms(groups: Mapping[str, Sequence[int]], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    top = max((max(v) for v in groups.values() if v), default=1)
    bins = [i * top / 30 for i in range(31)]
    for name, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (mean {statistics.fmean(values):.0f})")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("problems")
    ax.set_title(title, fontsize=10)
    ax.legend()
    return save_figure(fig, path)
