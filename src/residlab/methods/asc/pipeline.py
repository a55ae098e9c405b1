"""Activation-Steered Compression end to end: pairs -> vector -> strength -> evaluation -> report.

Every stage caches what it computed under ``work_dir`` (generation records are append-only and
keyed by a fingerprint of what produced them), so a second run, a killed run or a larger run reuses
all finished work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from residlab.core.errors import ResidlabError
from residlab.core.io import atomic_write_text, write_json
from residlab.data import Problem, load_problems
from residlab.engines import Engine, open_engine
from residlab.evaluation.report import (
    compare,
    comparison_dict,
    markdown_table,
    plot_accuracy_vs_tokens,
    plot_token_histograms,
    summarize,
)
from residlab.evaluation.runner import Condition, Decoding, evaluate
from residlab.methods.asc import prompts
from residlab.methods.asc.pairs import TeacherClient, TracePair, build_pairs
from residlab.methods.asc.vector import extract_vector
from residlab.models.lm import LanguageModel
from residlab.models.loading import load
from residlab.models.registry import DEFAULT_MODEL, packaged_model
from residlab.recipes.calibration import calibrate, kl_bound, measured_kl
from residlab.recipes.extraction import ExtractionResult
from residlab.vectors.steering_vector import SteeringVector


@dataclass
class CompressConfig:
    """Everything ``residlab compress`` decides. Defaults fit ~20 minutes on a 2-core CPU."""

    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # torch: bfloat16 where the CPU runs it natively, else float32
    engine: str = "auto"  # generation engine for traces and evaluation (auto: llamacpp when installed)
    pairs_dataset: str = "gsm8k"  # calibration problems come from its train split
    pairs: int = 48
    pair_source: str = "reference"
    pair_samples: int = 4  # samples per problem for pair_source="sampled"
    max_concise_ratio: float | None = None  # if set, drop pairs whose concise trace exceeds this x the verbose one
    keep: str = "both_correct"
    project_out: str | None = None  # a second pair source whose direction is removed from the vector
    teacher_url: str | None = None
    teacher_model: str = "default"
    pairs_file: str | None = None
    read: str = "mean"
    method: str = "mean_diff"
    layer: int | None = None  # None: the model's tuned layer (registry), else the best separated middle layer
    strength: float | str | None = None  # x residual norm at the layer (unit vector); "auto" = KL bound,
    # "auto-centred" = the same bound on mean-free logit changes (tighter, still valid);
    # None: the model's tuned strength (registry), else 0.25
    eps: float = 1e-3
    positions: str = "prompt_last+generated"
    eval_dataset: str = "gsm8k"
    eval_split: str = "test"
    limit: int = 40
    max_new_tokens: int = 512
    batch_size: int = 8
    data_dir: str | None = None
    work_dir: str = "residlab-out"
    conditions: tuple[str, ...] = ("baseline", "asc", "concise_prompt", "asc+concise_prompt")
    calibration_states: int = 16
    extra: dict[str, Any] = field(default_factory=dict)

    def run_dir(self) -> Path:
        return run_dir_for(self.work_dir, self.model)


def run_dir_for(work_dir: str | Path, model: str) -> Path:
    """``<work_dir>/<model name>``: a packaged name or hub id as is, a local path by its last part."""
    name = Path(model).stem if model.startswith((".", "/", "~")) or Path(model).exists() else model.replace("/", "_")
    return Path(work_dir) / name


def choose_layer(extraction: ExtractionResult, num_layers: int) -> int:
    """The best-separated layer among the middle half of the network (early layers carry token
    identity, the last ones are close to the output and steer poorly)."""
    middle = [k for k in extraction.separation if num_layers // 4 <= k < 3 * num_layers // 4]
    return max(middle, key=lambda k: extraction.separation[k])


def build_vector(
    lm: LanguageModel, cfg: CompressConfig, run_dir: Path, log=print, engine: Engine | None = None
) -> tuple[SteeringVector, ExtractionResult, dict[str, Any]]:
    """Pairs from the calibration split, the concise-minus-verbose vector and the pair statistics."""
    if cfg.project_out is not None and cfg.project_out == cfg.pair_source:
        raise ResidlabError(
            f"--project-out {cfg.project_out} is the pair source itself: nothing would be left of the vector.",
            hint="project out a different source, e.g. --pair-source reference --project-out sampled.",
        )
    calibration = load_problems(cfg.pairs_dataset, "train", data_dir=cfg.data_dir, limit=cfg.pairs)
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    teacher = TeacherClient(cfg.teacher_url, cfg.teacher_model) if cfg.teacher_url else None
    log(f"[1/4] traces for {len(calibration)} {cfg.pairs_dataset} train problems (concise: {cfg.pair_source})")
    pairs, pair_stats = _pairs(lm, cfg, cfg.pair_source, calibration, decoding, teacher, run_dir, engine)
    log(
        f"      {pair_stats['n_pairs']} pairs kept; verbose {pair_stats['mean_verbose_tokens']:.0f} tokens, "
        f"concise {pair_stats['mean_concise_tokens']:.0f} tokens on average"
    )
    log(f"[2/4] extracting the vector ({cfg.method}, read={cfg.read}) at all {lm.num_layers} layers")
    batch_size = max(1, cfg.batch_size // 2)
    extraction = extract_vector(lm, pairs, read=cfg.read, method=cfg.method, batch_size=batch_size)
    if cfg.project_out:
        log(f"      and the control direction to project out (concise source {cfg.project_out})")
        control_pairs, control_stats = _pairs(lm, cfg, cfg.project_out, calibration, decoding, teacher, run_dir, engine)
        control = extract_vector(lm, control_pairs, read=cfg.read, method=cfg.method, batch_size=batch_size).vector
        vector = extraction.vector.project_out(control)
        pair_stats["projected_out"] = {
            **control_stats,
            "source": cfg.project_out,
            "cosine_per_layer": {str(k): round(extraction.vector.cosine(control, k), 4) for k in vector.layers},
        }
        extraction = replace(extraction, vector=replace(vector, info={**vector.info, "projected_out": cfg.project_out}))
    return extraction.vector, extraction, pair_stats


def _pairs(
    lm: LanguageModel,
    cfg: CompressConfig,
    source: str,
    calibration: Sequence[Problem],
    decoding: Decoding,
    teacher: TeacherClient | None,
    run_dir: Path,
    engine: Engine | None,
) -> tuple[list[TracePair], dict[str, Any]]:
    """Pairs from one concise source, filtered as configured, and their statistics."""
    pairs, dropped = build_pairs(
        lm,
        calibration,
        source=source,
        work_dir=run_dir / "pairs",
        decoding=decoding,
        keep=cfg.keep,
        teacher=teacher,
        pairs_file=cfg.pairs_file,
        engine=engine,
        samples=cfg.pair_samples,
        max_concise_ratio=cfg.max_concise_ratio,
    )
    if len(pairs) < 2:
        raise ResidlabError(
            f"only {len(pairs)} usable {source} pair(s) out of {len(calibration)} ({dropped}).",
            hint="raise --pairs, or use --keep concise_correct / --keep all.",
        )
    stats = {
        "n_problems": len(calibration),
        "n_pairs": len(pairs),
        "dropped": dropped,
        "mean_verbose_tokens": sum(p.verbose_tokens for p in pairs) / len(pairs),
        "mean_concise_tokens": sum(p.concise_tokens for p in pairs) / len(pairs),
    }
    return pairs, stats


def run_compress(cfg: CompressConfig, log=print) -> dict[str, Any]:
    """The whole ASC pipeline; writes vector, records, report.md/json and plots into the run dir."""
    started = time.perf_counter()
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    lm = load(cfg.model, dtype=cfg.dtype)
    engine = open_engine(cfg.model, cfg.engine, lm=lm)
    log(f"      generation engine: {engine.kind} ({engine.identity})")
    raw, extraction, pair_stats = build_vector(lm, cfg, run_dir, log, engine)
    tuned = packaged_model(cfg.model)
    if cfg.layer is not None:
        layer = lm.check_layer(cfg.layer)
    elif tuned is not None and tuned.asc_layer is not None:
        layer = tuned.asc_layer
    else:
        layer = choose_layer(extraction, lm.num_layers)
    if cfg.strength is None:
        cfg.strength = tuned.asc_strength if tuned is not None and tuned.asc_strength is not None else 0.25
    raw.save(run_dir / "vector_all_layers.safetensors")
    unit = raw.select([layer]).normalized()
    log(
        f"      layer {layer}: separation {extraction.separation[layer]:.2f}, raw norm {raw.norm(layer):.2f} "
        f"= {extraction.relative_norm(layer):.1%} of the residual norm {extraction.residual_norm[layer]:.1f}"
    )

    log(f"[3/4] calibrating the strength (KL bound, eps={cfg.eps})")
    calib_problems = load_problems(
        cfg.pairs_dataset, "train", data_dir=cfg.data_dir, offset=cfg.pairs, limit=2 * cfg.calibration_states
    )
    texts = [lm.format_prompt(prompts.VERBOSE.format(question=p.question)) for p in calib_problems]
    # Calibration differentiates through the model: float32 for stable second derivatives.
    calib_lm = lm if lm.dtype == torch.float32 else load(cfg.model, dtype="float32")
    calibration = calibrate(
        calib_lm,
        texts[: cfg.calibration_states],
        texts[cfg.calibration_states :],
        layer,
        unit.directions[layer],
        eps=cfg.eps,
    )
    if cfg.strength == "auto":
        strength = calibration.strength
    elif cfg.strength == "auto-centred":
        strength = calibration.strength_centred
    else:
        strength = float(cfg.strength) * extraction.residual_norm[layer]
    # The KL the chosen strength actually causes on the held-out next-token distributions.
    kl_used = measured_kl(calib_lm, texts[cfg.calibration_states :], layer, unit.directions[layer], strength)
    del calib_lm
    kl_used_median = statistics.median(kl_used) if kl_used else float("nan")
    bound_used = kl_bound(calibration.a, calibration.lipschitz, strength)
    log(
        f"      a={calibration.a:.3g}, L={calibration.lipschitz:.3g}: bound strength {calibration.strength:.4g} "
        f"(measured KL median {calibration.measured_kl_median:.2e}; centred-logit bound: "
        f"{calibration.strength_centred:.4g}); using strength {strength:.4g} "
        f"(measured KL median {kl_used_median:.3g}, bound {bound_used:.3g})"
    )
    vector = SteeringVector(
        **{
            **unit.__dict__,
            "position_rule": cfg.positions,
            "info": {
                **unit.info,
                "strength": strength,
                "layer": layer,
                "raw_norm": raw.norm(layer),
                "residual_norm": extraction.residual_norm[layer],
                "kl_bound_strength": calibration.strength,
            },
        }
    )
    vector_path = vector.save(run_dir / "concise.safetensors")
    from residlab.analyses.lens import top_tokens

    promoted = [t for t, _ in top_tokens(lm, vector, k=12)]
    suppressed = [t for t, _ in top_tokens(lm, vector, k=12, largest=False)]
    log(f"      logit lens of the vector: promotes {promoted[:8]}, suppresses {suppressed[:8]}")

    problems = load_problems(cfg.eval_dataset, cfg.eval_split, data_dir=cfg.data_dir, limit=cfg.limit)
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    templates = {"baseline": prompts.VERBOSE, "concise_prompt": prompts.CONCISE}
    conditions = []
    for name in cfg.conditions:
        template = templates["concise_prompt" if "concise_prompt" in name else "baseline"]
        steered = name.startswith("asc")
        conditions.append(
            Condition(
                name,
                template,
                vector=vector if steered else None,
                strength=strength if steered else 0.0,
                positions=cfg.positions,
            )
        )
    log(
        f"[4/4] evaluating {len(problems)} {cfg.eval_dataset} {cfg.eval_split} problems x {len(conditions)} conditions "
        f"(greedy, {cfg.max_new_tokens} new tokens at most, batch {cfg.batch_size})"
    )
    records = {c.name: evaluate(engine, problems, c, decoding, run_dir / "runs") for c in conditions}

    summaries = {name: summarize(name, recs) for name, recs in records.items()}
    base = summaries[cfg.conditions[0]]
    comparisons = {
        name: comparison_dict(base, summaries[name], compare(records[cfg.conditions[0]], records[name]))
        for name in cfg.conditions[1:]
    }
    report = {
        "model": lm.name,
        "engine": engine.kind,
        "engine_identity": engine.identity,
        "dtype": str(lm.dtype).removeprefix("torch.") if engine.kind == "torch" else "GGUF weights",
        "config": asdict(cfg),
        "n_pairs": pair_stats["n_pairs"],
        "n_eval": len(problems),
        "layer": layer,
        "strength": strength,
        "strength_applies_to": "unit vector",
        "positions": cfg.positions,
        "pairs": pair_stats,
        "separation": extraction.separation,
        "residual_norm": extraction.residual_norm,
        "calibration": {
            **calibration.as_dict(),
            "measured_kl_at_used_strength_median": kl_used_median,
            "bound_at_used_strength": bound_used,
        },
        "vector_promotes": promoted,
        "vector_suppresses": suppressed,
        "conditions": {name: asdict(s) for name, s in summaries.items()},
        "comparisons": comparisons,
        "vector": str(vector_path),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(run_dir / "report.json", report)
    plot_accuracy_vs_tokens(
        [(n, s) for n, s in summaries.items()],
        run_dir / "accuracy_vs_tokens.png",
        f"{lm.name}: {cfg.eval_dataset} {cfg.eval_split}, n={len(problems)}",
    )
    plot_token_histograms(
        {n: [r["tokens"] for r in records[n]] for n in cfg.conditions[:2]},
        run_dir / "token_histogram.png",
        f"{lm.name}: generated tokens",
    )
    lines = [
        f"# ASC report: {lm.name}",
        "",
        f"Vector: {pair_stats['n_pairs']} {cfg.pairs_dataset} train pairs ({cfg.pair_source} concise traces"
        + (f"; minus its component along the {cfg.project_out} pairs' direction" if cfg.project_out else "")
        + "), "
        f"{cfg.method} read={cfg.read}, layer {layer}, strength {strength:.4g} on the unit vector "
        f"(KL-bound strength for eps={cfg.eps}: {calibration.strength:.4g}), positions {cfg.positions}.",
        f"Logit lens of the vector: promotes {promoted}, suppresses {suppressed}.",
        f"Evaluation: {len(problems)} {cfg.eval_dataset} {cfg.eval_split} problems, greedy, "
        f"{cfg.max_new_tokens} new tokens at most, batch {cfg.batch_size}, engine {engine.identity}.",
        "",
        markdown_table(list(summaries.values()), cfg.conditions[0]),
        "",
        "Paired against the baseline (bootstrap 95% CI of the accuracy difference; exact McNemar):",
        "",
    ]
    for name, c in comparisons.items():
        low, high = c["accuracy_difference_ci95"]
        lines.append(
            f"- {name}: accuracy {c['accuracy_difference']:+.1%} ({low:+.1%} to {high:+.1%}), "
            f"McNemar p={c['mcnemar_p']:.3f}, token reduction {c['token_reduction']:+.1%}, "
            f"speedup {c['speedup']:.2f}x"
        )
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    log(markdown_table(list(summaries.values()), cfg.conditions[0]))
    log(
        f"vector: {vector_path}\nreport: {run_dir / 'report.md'} (+ report.json, accuracy_vs_tokens.png, "
        f"token_histogram.png)"
    )
    return report
