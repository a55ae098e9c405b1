"""A faithfulness run saved: ``patching.json``, heatmaps, scatter plots and a markdown report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from residlab.analyses.patching.faithfulness import ESTIMATES, Faithfulness, FamilyEffects
from residlab.analyses.patching.relp import applied_rule_names
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.io import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class PatchingResult(AnalysisResult):
    """Per-site effects of every method, their correlations with exact patching and their wall-clock."""

    json_file: ClassVar[str] = "patching.json"

    model: str
    architecture: str
    dataset: str
    metric: str
    num_pairs: int
    window: int
    tokens: list[str]
    clean_score: float
    corrupted_score: float
    rules: list[str]
    families: list[FamilyEffects]
    rules_source: str = ""
    ig_steps: int = 0  # the estimates' gradients: at the corrupted run (0) or averaged over N input-path points

    @classmethod
    def from_run(cls, run: Faithfulness, *, model: str, architecture: str, dataset: str) -> PatchingResult:
        return cls(
            model, architecture, dataset, run.metric, run.num_pairs, run.window, list(run.tokens),
            run.clean_score, run.corrupted_score, list(run.rules), run.families, run.rules_source, run.ig_steps,
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for fam in self.families:
            row: dict[str, Any] = {"n_sites": fam.num_sites, "noop_sites": fam.noop_sites}
            for method in ESTIMATES:
                if method in fam.pearson:
                    row[f"pearson_{method}"] = fam.pearson[method]
                    row[f"spearman_{method}"] = fam.spearman[method]
            for method, seconds in fam.seconds.items():
                row[f"seconds_{method}"] = seconds
            for method in ESTIMATES:
                if method in fam.seconds and "exact" in fam.seconds:
                    row[f"speedup_{method}"] = fam.seconds["exact"] / max(fam.seconds[method], 1e-9)
            misses = {m: misses_of(fam, m, self.tokens) for m in ESTIMATES if m in fam.pearson}
            if misses:
                row["misses"] = misses
            rows[fam.family] = row
        return {"clean_score": self.clean_score, "corrupted_score": self.corrupted_score, "families": rows}

    # -- figures ------------------------------------------------------------------------------
    def _grid(self, plt: Any, unit: str, xlabel: str) -> Figure | None:
        fams = [f for f in self.families if f.unit == unit]
        if not fams:
            return None
        methods = list(fams[0].effects)
        fig, axes = plt.subplots(len(fams), len(methods), figsize=(4.2 * len(methods), 3.4 * len(fams)), squeeze=False)
        for r, fam in enumerate(fams):
            for c, method in enumerate(methods):
                grid = fam.effects[method]
                bound = max((abs(v) for row in grid for v in row if not math.isnan(v)), default=1.0) or 1.0
                ax = axes[r][c]
                im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, origin="lower")
                r_text = f" (r={fam.pearson[method]:.2f})" if method in fam.pearson else ""
                ax.set_title(f"{fam.family}: {method}{r_text}", fontsize=9)
                ax.set_ylabel("layer" if self.window == 1 else f"first layer of {self.window}")
                ax.set_xlabel(xlabel)
                ax.yaxis.get_major_locator().set_params(integer=True)
                if unit == "position":
                    ax.set_xticks(range(len(self.tokens)))
                    ax.set_xticklabels(self.tokens, rotation=90, fontsize=6)
                fig.colorbar(im, ax=ax, fraction=0.046)
        return fig

    @figure("positions.png")
    def _positions(self, plt: Any) -> Figure | None:
        return self._grid(plt, "position", "position (first pair's tokens)")

    @figure("heads.png")
    def _heads(self, plt: Any) -> Figure | None:
        return self._grid(plt, "head", "head")

    @figure("scatter.png")
    def _scatter(self, plt: Any) -> Figure | None:
        fams = [f for f in self.families if "exact" in f.effects and f.pearson]
        if not fams:
            return None
        fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.4), squeeze=False)
        for ax, fam in zip(axes[0], fams, strict=True):
            exact = [v for row in fam.effects["exact"] for v in row]
            for method in fam.pearson:
                est = [v for row in fam.effects[method] for v in row]
                ax.scatter(exact, est, s=6, alpha=0.6, label=f"{method} r={fam.pearson[method]:.3f}")
            lo, hi = min(exact), max(exact)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
            ax.set_title(fam.family, fontsize=9)
            ax.set_xlabel("exact patching effect")
            ax.set_ylabel("estimate")
            ax.legend(fontsize=7)
        return fig

    # -- report -------------------------------------------------------------------------------
    def markdown(self, figures: list[str]) -> str:
        """A short report: the setup, one table row per family, the ``figures`` (PNG file names)."""
        lines = [
            f"# Patching faithfulness: {self.model} on {self.dataset}",
            "",
            f"{self.num_pairs} prompt pairs, metric {self.metric} (clean {self.clean_score:.3f}, corrupted "
            f"{self.corrupted_score:.3f}), window {self.window}. RelP rules: {'; '.join(self.rules) or 'n/a'}"
            f"{f' ({self.rules_source})' if self.rules_source else ''}. Estimates' gradients: "
            + (f"averaged over {self.ig_steps} points of the input path" if self.ig_steps else "at the corrupted run")
            + ".",
            "",
            "| family | sites | no-op | Pearson AtP | Pearson RelP | Spearman AtP | Spearman RelP "
            "| s exact | s AtP | s RelP | RelP rules |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for fam in self.families:
            cells = [fam.family, str(fam.num_sites), str(fam.noop_sites)]
            cells += [_num(fam.pearson.get(m)) for m in ESTIMATES] + [_num(fam.spearman.get(m)) for m in ESTIMATES]
            cells += [_num(fam.seconds.get(m), 2) for m in ("exact", *ESTIMATES)]
            cells.append("+".join(applied_rule_names(fam.rules)) or ("none" if "relp" in fam.seconds else "-"))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "No-op sites write the value the corrupted run already has (positions before the prompts "
                  "differ): their effect is exactly 0 and they are not run.", ""]  # fmt: skip
        lines += self._misses_markdown()
        lines += [f"![{name}]({name})" for name in figures]
        return "\n".join(lines) + "\n"

    def _misses_markdown(self) -> list[str]:
        lines = []
        for fam in self.families:
            for method in (m for m in ESTIMATES if m in fam.pearson):
                misses = misses_of(fam, method, self.tokens)
                sites = "; ".join(
                    f"layer {s['layer']} {s['unit']}: exact {s['exact']:+.3f}, estimate {s['estimate']:+.3f} "
                    f"({s['share']:.0%})"
                    for s in misses["sites"]
                )
                where = misses.get("position")
                at = f" {where['share']:.0%} of it at position {where['unit']}." if where else ""
                lines.append(f"- {fam.family}, {method}: largest squared errors: {sites}.{at}")
        return ["## Where the estimates miss exact patching", "", *lines, ""] if lines else []

    def save(self, out_dir: str | Path) -> list[Path]:
        """JSON, figures, and ``report.md``."""
        paths = super().save(out_dir)
        report = Path(out_dir) / "report.md"
        atomic_write_text(report, self.markdown([p.name for p in paths if p.suffix == ".png"]))
        return [*paths, report]


def misses_of(fam: FamilyEffects, method: str, tokens: Sequence[str], top: int = 3) -> dict[str, Any]:
    """Where ``method``'s estimate is furthest from exact patching in ``fam``: the ``top`` sites by
    squared error (layer, unit, both effects, share of the family's squared error) and, for position
    families, the position that holds the largest share. Sites with a non-finite effect are counted
    (``nan_sites``) and left out."""
    exact = [v for row in fam.effects["exact"] for v in row]
    estimate = [v for row in fam.effects[method] for v in row]
    errors = [(e - x) ** 2 for x, e in zip(exact, estimate, strict=True)]
    finite = [i for i, err in enumerate(errors) if math.isfinite(err)]
    total = sum(errors[i] for i in finite) or 1.0
    units = len(fam.effects["exact"][0]) if fam.effects["exact"] else 1

    def label(unit: int) -> str:
        if fam.unit == "position":
            return f"{unit} {tokens[unit]!r}" if unit < len(tokens) else f"position {unit}"
        return f"{fam.unit} {unit}"

    worst = sorted(finite, key=errors.__getitem__, reverse=True)[:top]
    out: dict[str, Any] = {
        "sites": [
            {"layer": i // units, "unit": label(i % units), "exact": exact[i], "estimate": estimate[i],
             "share": errors[i] / total}
            for i in worst
        ],
        "nan_sites": len(errors) - len(finite),
    }  # fmt: skip
    if fam.unit == "position" and finite:
        by_unit = [sum(errors[i] for i in finite if i % units == u) / total for u in range(units)]
        worst_unit = max(range(units), key=by_unit.__getitem__)
        out["position"] = {"unit": label(worst_unit), "share": by_unit[worst_unit]}
    return out


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
