"""Activation-Steered Compression end to end: pairs -> vector -> layer and strength -> calibration ->
evaluation -> report, each stage its own module of this package.

Every stage caches what it computed under ``work_dir`` (generation records are append-only and
keyed by a fingerprint of what produced them), so a second run, a killed run or a larger run reuses
all finished work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.core.types import Log
from residlab.data import load_problems
from residlab.engines import Engine, open_engine
from residlab.evaluation.runner import Evaluator, evaluate
from residlab.methods.asc.calibration import CalibratedStrength, CalibrationProblems, calibrate_strength
from residlab.methods.asc.conditions import compress_conditions
from residlab.methods.asc.config import CompressConfig
from residlab.methods.asc.report import CompressOutcome, write_report
from residlab.methods.asc.steering import SteeringChoice, resolve_steering
from residlab.methods.asc.vector import ConciseVector, steering_vector, vector_lens
from residlab.methods.asc.vector_methods import vector_method
from residlab.models.lm import LanguageModel
from residlab.models.loading import load
from residlab.models.registry import packaged_model
from residlab.recipes.calibration import Calibration
from residlab.vectors.steering_vector import SteeringVector


def run_compress(cfg: CompressConfig, log: Log = print, evaluator: Evaluator = evaluate) -> dict[str, Any]:
    """The whole ASC pipeline; writes vector, records, report.md/json and plots into the run dir.
    ``evaluator`` runs the evaluation stage (this process by default; a Ray pool spreads the problems)."""
    started = time.perf_counter()
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    lm = load(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    engine = open_engine(cfg.model, cfg.engine, lm=lm, n_gpu_layers=cfg.n_gpu_layers)
    log(f"      generation engine: {engine.kind} ({engine.identity})")
    for extra in cfg.also_layers:  # before any work
        lm.check_layer(extra)
        if extra < engine.first_steerable_layer:
            raise ResidlabError(
                f"--also-layers {extra}: the {engine.kind} engine steers layers >= {engine.first_steerable_layer}.",
                hint="leave that layer out, or use --engine torch.",
            )
    stages = {"load": time.perf_counter() - started}
    concise, steering, choose = _vector_stage(lm, cfg, run_dir, engine, log)
    stages["pairs_and_vector"] = time.perf_counter() - started - sum(stages.values())
    extraction, layer = concise.extraction, steering.layer
    raw = concise.vector
    raw.save(run_dir / "vector_all_layers.safetensors")
    log(
        f"      layer {layer}: separation {extraction.separation[layer]:.2f}, raw norm {raw.norm(layer):.2f} "
        f"= {extraction.relative_norm(layer):.1%} of the residual norm {extraction.residual_norm[layer]:.1f}"
    )

    strength, calibrated = _strength_stage(lm, cfg, layer, raw.select([layer]).normalized(), choose, log)
    stages["calibration"] = time.perf_counter() - started - sum(stages.values())
    bound_strength = calibrated.calibration.strength if calibrated is not None else None
    trained = vector_method(cfg.method).refine is not None
    vector = steering_vector(
        concise, layer, strength, cfg.positions, bound_strength, tuple(cfg.also_layers), trained=trained
    )
    vector_path = vector.save(run_dir / "concise.safetensors")
    lens = vector_lens(lm, vector)
    log(f"      logit lens of the vector: promotes {lens.promotes[:8]}, suppresses {lens.suppresses[:8]}")

    problems = load_problems(
        cfg.eval_dataset, cfg.eval_split, data_dir=cfg.data_dir, limit=cfg.limit, offset=cfg.eval_offset
    )
    decoding = cfg.decoding()
    conditions = compress_conditions(cfg.condition_names, vector, strength, cfg.positions)
    log(
        f"[4/4] evaluating {len(problems)} {cfg.eval_dataset} {cfg.eval_split} problems x {len(conditions)} conditions "
        f"({decoding.describe()}, {cfg.max_new_tokens} new tokens at most, batch {cfg.batch_size})"
    )
    records = {c.name: evaluator(engine, problems, c, decoding, run_dir / "runs") for c in conditions}
    stages["evaluation"] = time.perf_counter() - started - sum(stages.values())
    outcome = CompressOutcome(
        config=cfg,
        model_name=lm.name,
        engine_kind=engine.kind,
        engine_identity=engine.identity,
        dtype=str(lm.dtype).removeprefix("torch.") if engine.kind == "torch" else "GGUF weights",
        concise=concise,
        steering=steering,
        strength=strength,
        calibrated=calibrated,
        lens=lens,
        records=records,
        n_eval=len(problems),
        vector_path=vector_path,
        seconds=round(time.perf_counter() - started, 1),
        stage_seconds={k: round(v, 1) for k, v in stages.items()},
    )
    return write_report(run_dir, outcome, log)


def _strength_stage(
    lm: LanguageModel,
    cfg: CompressConfig,
    layer: int,
    unit: SteeringVector,
    choose: Callable[[Calibration | None], float],
    log: Log,
) -> tuple[float, CalibratedStrength | None]:
    """The strength on the unit vector, and the KL-bound calibration when ``cfg`` runs it (else None)."""
    if not cfg.runs_kl_bound:
        strength = choose(None)
        log(f"[3/4] strength {strength:.4g} on the unit vector; KL bound not computed (--kl-bound computes it)")
        return strength, None
    log(f"[3/4] calibrating the strength (KL bound, eps={cfg.eps})")
    problems = CalibrationProblems.after_pairs(cfg)
    direction = unit.directions[layer]
    calibrated = calibrate_strength(cfg.model, problems, layer, direction, eps=cfg.eps, lm=lm, choose=choose)
    bound = calibrated.calibration
    log(
        f"      a={bound.a:.3g}, L={bound.lipschitz:.3g}: bound strength {bound.strength:.4g} "
        f"(measured KL median {bound.measured_kl_median:.2e}; centred-logit bound: "
        f"{bound.strength_centred:.4g}); using strength {calibrated.strength:.4g} "
        f"(measured KL median {calibrated.measured_kl_median:.3g}, bound {calibrated.bound:.3g})"
    )
    return calibrated.strength, calibrated


def _vector_stage(
    lm: LanguageModel, cfg: CompressConfig, run_dir: Path, engine: Engine, log: Log
) -> tuple[ConciseVector, SteeringChoice, Callable[[Calibration | None], float]]:
    """The vector by ``cfg.method``, the steering layer and strength, and how the strength is chosen
    from the calibration (a refined method's vector carries its own strength: its norm)."""
    method = vector_method(cfg.method)
    concise = method.build(lm, cfg, run_dir / "pairs", engine, log)
    steering = resolve_steering(
        cfg.layer,
        cfg.strength,
        tuned=packaged_model(cfg.model),
        separation=concise.extraction.separation,
        num_layers=lm.num_layers,
        model_name=lm.name,
    )
    layer = steering.layer
    if layer in cfg.also_layers:
        raise ResidlabError(
            f"--also-layers {','.join(map(str, cfg.also_layers))} includes the steering layer {layer} "
            f"({steering.layer_source}).",
            hint="leave that layer out of --also-layers (what was computed so far is cached).",
        )
    choose = partial(steering.absolute_strength, concise.extraction.residual_norm[layer])
    if method.refine is None:
        return concise, steering, choose
    start = float(steering.strength) * concise.extraction.residual_norm[layer]
    refined = method.refine(lm, cfg, concise, layer, start, run_dir, engine, log)
    norm = refined.vector.norm(layer)
    return refined, steering, lambda calibration: norm
