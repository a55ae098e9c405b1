"""ASC stage 5: what a compress run found, as report.json, report.md and two plots in the run dir."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from residlab.core.io import atomic_write_text, write_json
from residlab.core.types import Log
from residlab.evaluation.frontier import FrontierPoint, plot_frontier, tokens_saved
from residlab.evaluation.records import EvalRecord
from residlab.evaluation.report import (
    ConditionSummary,
    compare,
    comparison_dict,
    cut_off_warning,
    markdown_table,
    plot_accuracy_vs_tokens,
    plot_token_histograms,
    summarize,
)
from residlab.methods.asc.calibration import CalibratedStrength
from residlab.methods.asc.conditions import parse_condition_name
from residlab.methods.asc.config import CompressConfig
from residlab.methods.asc.steering import SteeringChoice
from residlab.methods.asc.vector import ConciseVector, VectorLens


@dataclass(frozen=True)
class CompressOutcome:
    """Everything a compress run produced that its report shows."""

    config: CompressConfig  # as given
    model_name: str
    engine_kind: str
    engine_identity: str
    dtype: str  # the torch dtype of the generating model, or "GGUF weights"
    concise: ConciseVector
    steering: SteeringChoice
    strength: float  # on the unit vector
    calibrated: CalibratedStrength | None  # the KL-bound calibration, when the run computed it
    lens: VectorLens
    records: dict[str, list[EvalRecord]]  # per condition, in the config's order (the first is the baseline)
    n_eval: int
    vector_path: Path
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)  # load, pairs_and_vector, calibration, evaluation

    @property
    def summaries(self) -> dict[str, ConditionSummary]:
        return {name: summarize(name, records) for name, records in self.records.items()}

    @property
    def baseline(self) -> str:
        return self.config.condition_names[0]


def report_dict(outcome: CompressOutcome) -> dict[str, Any]:
    """report.json: the run's settings, the vector's statistics, the calibration and every comparison."""
    cfg, concise = outcome.config, outcome.concise
    summaries = outcome.summaries
    pairs: dict[str, Any] = asdict(concise.pairs)
    if concise.projected_out is not None:
        control = concise.projected_out
        pairs["projected_out"] = {
            **asdict(control.pairs),
            "source": control.source,
            "cosine_per_layer": control.cosine_per_layer,
        }
    return {
        "model": outcome.model_name,
        "engine": outcome.engine_kind,
        "engine_identity": outcome.engine_identity,
        "dtype": outcome.dtype,
        # The config with the strength it left open filled in (what the run used).
        "config": asdict(replace(cfg, strength=outcome.steering.strength)),
        "method": cfg.method,
        "pair_source": "prompt-contrast" if cfg.method == "prompt-contrast" else cfg.pair_source,
        "adaptive": cfg.adaptive,
        "n_pairs": concise.pairs.n_pairs,
        "n_eval": outcome.n_eval,
        "layer": outcome.steering.layer,
        "also_layers": list(cfg.also_layers),  # steered too (the vector file holds their directions)
        "strength": outcome.strength,
        "strength_applies_to": "unit vector",
        "positions": cfg.positions,
        "steering_sources": {"layer": outcome.steering.layer_source, "strength": outcome.steering.strength_source},
        "pairs": pairs,
        "learned": {k.removeprefix("learned_"): v for k, v in concise.vector.info.items() if k.startswith("learned_")}
        or None,
        "separation": concise.extraction.separation,
        "residual_norm": concise.extraction.residual_norm,
        "calibration": outcome.calibrated.report() if outcome.calibrated is not None else None,
        "vector_promotes": outcome.lens.promotes,
        "vector_suppresses": outcome.lens.suppresses,
        "conditions": {name: asdict(s) for name, s in summaries.items()},
        "comparisons": _comparisons(outcome, summaries),
        "frontier": _frontier(outcome),
        "vector": str(outcome.vector_path),
        "seconds": outcome.seconds,
        "stage_seconds": outcome.stage_seconds,  # this run's wall time per stage (cached work costs nothing)
    }


def _frontier(outcome: CompressOutcome) -> dict[str, dict[str, Any]]:
    """Tokens saved at accuracy within 2 points of the baseline (bootstrap CI), per condition after the first."""
    base = FrontierPoint.from_records(outcome.baseline, outcome.records[outcome.baseline])
    return {
        name: asdict(tokens_saved(base, [FrontierPoint.from_records(name, records)]))
        for name, records in outcome.records.items()
        if name != outcome.baseline
    }


def _plot_frontier(outcome: CompressOutcome, path: Path) -> None:
    """Accuracy vs tokens: steered conditions as one line per prompt, prompt-only conditions as markers."""
    steered: dict[str, list[tuple[float, float, str]]] = {}
    references: dict[str, tuple[float, float]] = {}
    for name, records in outcome.records.items():
        point = FrontierPoint.from_records(name, records)
        is_steered, schedule, template_name = parse_condition_name(name)
        if is_steered:
            group = f"{outcome.config.method} {schedule or 'constant'} ({template_name})"
            steered.setdefault(group, []).append((point.mean_tokens, point.accuracy, ""))
        else:
            references[name] = (point.mean_tokens, point.accuracy)
    cfg = outcome.config
    title = f"{outcome.model_name}: {cfg.eval_dataset} {cfg.eval_split}, n={outcome.n_eval}"
    plot_frontier(steered, references, path, title)


def _comparisons(outcome: CompressOutcome, summaries: dict[str, ConditionSummary]) -> dict[str, dict[str, Any]]:
    """Every condition after the first, paired against the first."""
    base = outcome.baseline
    return {
        name: comparison_dict(summaries[base], summaries[name], compare(outcome.records[base], records))
        for name, records in outcome.records.items()
        if name != base
    }


def report_markdown(outcome: CompressOutcome, report: dict[str, Any]) -> str:
    """report.md: how the vector was made, the results table and the paired comparisons."""
    cfg, steering = outcome.config, outcome.steering
    strength = outcome.strength
    bound = (
        f"KL-bound strength for eps={cfg.eps}: {outcome.calibrated.calibration.strength:.4g}"
        if outcome.calibrated is not None
        else "KL bound not computed"
    )
    projected = f"; minus its component along the {cfg.project_out} pairs' direction" if cfg.project_out else ""
    sides = "concise vs plain instruction" if cfg.method == "prompt-contrast" else f"{cfg.pair_source} concise traces"
    adaptive = f", adaptive strength {cfg.adaptive}" if cfg.adaptive else ""
    how = "trained jointly" if outcome.concise.vector.info.get("learned_layers") else "at the same relative strength"
    also = f" (and {', '.join(map(str, cfg.also_layers))}, {how})" if cfg.also_layers else ""
    lines = [
        f"# ASC report: {outcome.model_name}",
        "",
        f"Vector: {outcome.concise.pairs.n_pairs} {cfg.pairs_dataset} train pairs ({sides}"
        f"{projected}), {cfg.method} read={cfg.read}, layer {steering.layer}{also}, "
        f"strength {strength:.4g}{adaptive} on the unit "
        f"vector ({bound}), positions {cfg.positions}.",
        f"Logit lens of the vector: promotes {outcome.lens.promotes}, suppresses {outcome.lens.suppresses}.",
        f"Evaluation: {outcome.n_eval} {cfg.eval_dataset} {cfg.eval_split} problems, {cfg.decoding().describe()}, "
        f"{cfg.max_new_tokens} new tokens at most, batch {cfg.batch_size}, engine {outcome.engine_identity}.",
        "",
        markdown_table(list(outcome.summaries.values()), outcome.baseline),
        "",
        "Paired against the baseline (bootstrap 95% CI of the accuracy difference; exact McNemar):",
        "",
    ]
    for name, c in report["comparisons"].items():
        low, high = c["accuracy_difference_ci95"]
        lines.append(
            f"- {name}: accuracy {c['accuracy_difference']:+.1%} ({low:+.1%} to {high:+.1%}), "
            f"McNemar p={c['mcnemar_p']:.3f}, token reduction {c['token_reduction']:+.1%}, "
            f"speedup {c['speedup']:.2f}x; tokens saved within 2 points of the baseline "
            f"{report['frontier'][name]['estimate']:.1%} ({report['frontier'][name]['ci95'][0]:.1%} to "
            f"{report['frontier'][name]['ci95'][1]:.1%})"
        )
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, outcome: CompressOutcome, log: Log = print) -> dict[str, Any]:
    """Write report.json, accuracy_vs_tokens.png, token_histogram.png and report.md; return the report."""
    cfg = outcome.config
    report = report_dict(outcome)
    write_json(run_dir / "report.json", report)
    summaries = outcome.summaries
    plot_accuracy_vs_tokens(
        list(summaries.items()),
        run_dir / "accuracy_vs_tokens.png",
        f"{outcome.model_name}: {cfg.eval_dataset} {cfg.eval_split}, n={outcome.n_eval}",
    )
    plot_token_histograms(
        {name: [r.tokens for r in outcome.records[name]] for name in cfg.condition_names[:2]},
        run_dir / "token_histogram.png",
        f"{outcome.model_name}: generated tokens",
    )
    _plot_frontier(outcome, run_dir / "frontier.png")
    atomic_write_text(run_dir / "report.md", report_markdown(outcome, report))
    log(markdown_table(list(summaries.values()), outcome.baseline))
    for summary in summaries.values():
        if (warning := cut_off_warning(summary, cfg.max_new_tokens)) is not None:
            log(warning)
    log(
        f"vector: {outcome.vector_path}\nreport: {run_dir / 'report.md'} (+ report.json, accuracy_vs_tokens.png, "
        f"token_histogram.png)"
    )
    return report
