"""``residlab compress``, ``eval`` and ``sweep``: the ASC commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from residlab.cli.errors import handle_errors
from residlab.cli.options import (
    DEFAULT_POSITIONS,
    AlsoLayersOption,
    DataDirOption,
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    EngineOption,
    Layers,
    LayersOption,
    ModelOption,
    NGpuLayersOption,
    PositionsOption,
    RayActorsOption,
    RayOption,
    SeedOption,
    TemperatureOption,
    TopPOption,
    WorkDirOption,
    parse_strength,
)
from residlab.cli.runners import evaluator_for
from residlab.engines import EngineSpec
from residlab.models.registry import DEFAULT_MODEL

console = Console(highlight=False, soft_wrap=True, stderr=True)
MaxNewTokens = Annotated[int, typer.Option(min=1, help="New tokens per answer, at most.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")]


def _log(message: str) -> None:
    console.print(message, markup=False)


def compress(
    model: ModelOption = DEFAULT_MODEL,
    pairs: Annotated[int, typer.Option(min=2, help="Calibration problems from the train split.")] = 16,
    pairs_dataset: Annotated[str, typer.Option(help="Dataset whose train split gives the pairs.")] = "gsm8k",
    calibration_states: Annotated[int, typer.Option(min=1, help="States for the KL-bound estimate.")] = 16,
    kl_bound: Annotated[
        bool,
        typer.Option(
            help="Also compute the paper's KL bound for the vector (minutes of float32 work on a CPU; always "
            "computed for --strength auto). It is loose by ~10^6 on the packaged models, so it is off by default."
        ),
    ] = False,
    pair_source: Annotated[
        str,
        typer.Option(
            help="Concise traces: reference, self, sampled, teacher, rewrite (the model's own correct trace made "
            "dense by --teacher-url or the model itself), prune (that trace without its announced plan and units), "
            "prune-prose (also without its narrating sentences), prune-equations (only the lines that compute) "
            "or file."
        ),
    ] = "reference",
    pair_samples: Annotated[
        int, typer.Option(min=1, help="Samples per problem for --pair-source sampled (shortest correct wins).")
    ] = 4,
    max_concise_ratio: Annotated[
        float | None,
        typer.Option(min=0.0, help="Drop pairs whose concise trace exceeds this fraction of the verbose one."),
    ] = None,
    keep: Annotated[str, typer.Option(help="Pair filter: both_correct, concise_correct or all.")] = "concise_correct",
    project_out: Annotated[
        str | None,
        typer.Option(
            help="A second concise source whose direction is removed from the vector (e.g. sampled: the model's "
            "own shortest correct samples vs its greedy traces, mostly 'text the model would not write greedily')."
        ),
    ] = None,
    teacher_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint for --pair-source teacher or rewrite.")
    ] = None,
    teacher_model: str = "default",
    teacher_concurrency: Annotated[
        int, typer.Option(min=1, help="Requests kept in flight to --teacher-url (its server batches them).")
    ] = 8,
    pairs_file: Annotated[Path | None, typer.Option(help="JSONL with id and concise (--pair-source file).")] = None,
    read: Annotated[str, typer.Option(help="Read residuals at the trace's 'mean' or 'last' token.")] = "mean",
    method: Annotated[
        str,
        typer.Option(
            help="How the vector is made: mean_diff (trace pairs), pca, logistic, prompt-contrast (concise vs plain "
            "instruction, no traces) or learned (trained from mean_diff: contrastive energy loss + KL hinge)."
        ),
    ] = "learned",
    learn_steps: Annotated[int, typer.Option(min=1, help="--method learned: optimiser steps (resumable).")] = 12,
    learn_kl_eps: Annotated[
        float, typer.Option(min=0.0, help="--method learned: per-token KL on general text before the hinge bites.")
    ] = 0.05,
    learn_window: Annotated[
        int, typer.Option(min=1, help="--method learned: first tokens of each trace the preference loss sees.")
    ] = 96,
    learn_pairs_per_step: Annotated[int, typer.Option(min=1, help="--method learned: pairs per optimiser step.")] = 1,
    adaptive: Annotated[
        str | None,
        typer.Option(
            help="Adaptive strength for every steered condition: until-answer (stop after \\boxed{..}), "
            "step-boundaries (newline tokens only), entropy (scaled by next-token entropy), after-setup (off "
            "until the first '=', then on) or until-thought-ends (reasoning models: stop after </think>)."
        ),
    ] = None,
    conditions: Annotated[
        str,
        typer.Option(
            help="Comma list of conditions; the first is the baseline. Templates: baseline, concise_prompt, "
            "chain_of_draft; steered: asc, asc+<template>, asc-<schedule>[+<template>]."
        ),
    ] = "baseline,asc",
    layer: Annotated[
        int | None, typer.Option(help="Steering layer (default: the model's tuned layer, else best separation).")
    ] = None,
    also_layers: AlsoLayersOption = None,
    strength: Annotated[
        str | None,
        typer.Option(help="x residual norm at the layer (unit vector), 'auto' (KL bound) or 'auto-centred'."),
    ] = None,
    eps: Annotated[float, typer.Option(help="KL budget for the bound.")] = 1e-3,
    positions: PositionsOption = DEFAULT_POSITIONS,
    eval_dataset: Annotated[str, typer.Option("--eval", help="gsm8k, math500, synthetic or a .jsonl file.")] = "gsm8k",
    limit: Annotated[int, typer.Option(min=1, help="Evaluation problems (from the start of the test split).")] = 30,
    max_new_tokens: MaxNewTokens = 512,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = 0,
    batch_size: BatchSize = 8,
    dtype: DtypeOption = "auto",
    engine: EngineOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    n_gpu_layers: NGpuLayersOption | None = None,
    ray: RayOption = None,
    ray_actors: RayActorsOption = None,
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = Path("residlab-out"),
) -> None:
    """Build a concise-reasoning steering vector and prove its effect (the ASC pipeline)."""
    from residlab.core.io import check_writable_dir
    from residlab.methods.asc import CompressConfig, run_compress
    from residlab.methods.asc import parse_strength as parse_compress_strength

    cfg = CompressConfig(
        model=model,
        dtype=dtype,
        engine=engine,
        device=device,
        device_map=device_map,
        n_gpu_layers=n_gpu_layers,
        pairs=pairs,
        pairs_dataset=pairs_dataset,
        calibration_states=calibration_states,
        kl_bound=kl_bound,
        pair_source=pair_source,
        pair_samples=pair_samples,
        max_concise_ratio=max_concise_ratio,
        keep=keep,
        project_out=project_out,
        teacher_url=teacher_url,
        teacher_model=teacher_model,
        teacher_concurrency=teacher_concurrency,
        pairs_file=str(pairs_file) if pairs_file else None,
        read=read,
        method=method,
        learn_steps=learn_steps,
        learn_kl_eps=learn_kl_eps,
        learn_window=learn_window,
        learn_pairs_per_step=learn_pairs_per_step,
        adaptive=adaptive,
        conditions=tuple(c.strip() for c in conditions.split(",") if c.strip()),
        layer=layer,
        also_layers=tuple(also_layers or ()),
        strength=parse_compress_strength(strength),
        eps=eps,
        positions=positions.text,
        eval_dataset=eval_dataset,
        limit=limit,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None,
        work_dir=str(work_dir),
    )
    check_writable_dir(cfg.run_dir())  # before any model is loaded or trace generated
    spec = EngineSpec(model, engine, dtype, device, device_map, n_gpu_layers)
    with evaluator_for(spec, ray, ray_actors) as evaluator:
        run_compress(cfg, log=_log, evaluator=evaluator)
    full_size = {"gsm8k": "--limit 1319 (all of GSM8K test)", "math500": "--limit 500 (all of MATH-500)"}
    _log(
        f"Full-size evaluation: rerun the same command with {full_size.get(eval_dataset, 'a larger --limit')}; "
        "it reuses everything above."
    )


def evaluate_command(
    model: ModelOption = DEFAULT_MODEL,
    dataset: Annotated[str, typer.Option(help="gsm8k, math500, synthetic or a .jsonl file.")] = "gsm8k",
    split: str = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Problems to evaluate (all when not given).")] = 40,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many problems first.")] = 0,
    vector: Annotated[
        Path | None, typer.Option(help="Steering vector file (.safetensors or control-vector .gguf).")
    ] = None,
    strength: Annotated[
        str, typer.Option(help="Multiplies the vector as stored, or 'auto': KL bound on the unit vector.")
    ] = "1.0",
    eps: float = 1e-3,
    positions: PositionsOption = DEFAULT_POSITIONS,
    template: Annotated[
        str, typer.Option(help="baseline (step by step), concise_prompt or chain_of_draft.")
    ] = "baseline",
    max_new_tokens: MaxNewTokens = 512,
    batch_size: BatchSize = 8,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = 0,
    dtype: DtypeOption = "auto",
    engine: EngineOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    n_gpu_layers: NGpuLayersOption | None = None,
    ray: RayOption = None,
    ray_actors: RayActorsOption = None,
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = Path("residlab-out"),
    calibration_dataset: Annotated[
        str, typer.Option(help="With --strength auto: the dataset whose train split calibrates (as compress).")
    ] = "gsm8k",
    calibration_states: Annotated[
        int, typer.Option(min=1, help="With --strength auto: states for the KL-bound estimate (as compress).")
    ] = 16,
) -> None:
    """Evaluate a model (optionally steered) on a dataset; resumable, records reused."""
    from residlab.core.io import check_writable_dir
    from residlab.data import load_problems
    from residlab.evaluation.report import cut_off_warning, markdown_table, summarize
    from residlab.evaluation.runner import Condition, Decoding
    from residlab.methods.asc import CalibrationProblems, calibrate_vector, run_dir_for
    from residlab.methods.asc import template as template_named
    from residlab.vectors.files import load_vector

    prompt = template_named(template)
    value = parse_strength(strength) if strength != "auto" else 0.0  # a bad number fails before any loading
    folder = str(data_dir) if data_dir else None
    runs = check_writable_dir(run_dir_for(work_dir, model) / "runs")
    problems = load_problems(dataset, split, data_dir=folder, limit=limit, offset=offset)
    spec = EngineSpec(model, engine, dtype, device, device_map, n_gpu_layers)
    runner = spec.open()
    vec = None
    if vector is not None:
        vec = load_vector(vector, runner)
        if strength == "auto":
            states = CalibrationProblems(dataset=calibration_dataset, states=calibration_states, data_dir=folder)
            vec, calibrated = calibrate_vector(model, vec, states, eps=eps)
            value, cal = calibrated.strength, calibrated.calibration
            _log(
                f"auto strength at layer {cal.layer}: {value:.4g} on the unit vector (a={cal.a:.3g}, "
                f"L={cal.lipschitz:.3g}, measured KL median {cal.measured_kl_median:.2e})"
            )
    name = template if vec is None else f"{template}+vector"
    condition = Condition(
        name, prompt, vector=vec, strength=value if vec is not None else 0.0, positions=positions.text
    )
    decoding = Decoding(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size
    )
    with evaluator_for(spec, ray, ray_actors) as evaluator:
        records = evaluator(runner, problems, condition, decoding, runs)
    summary = summarize(name, records)
    print(markdown_table([summary], name))
    if (warning := cut_off_warning(summary, max_new_tokens)) is not None:
        _log(warning)
    where = f", on Ray at {ray}" if ray else ""
    print(f"records: {runs} ({runner.kind} engine{where})", file=sys.stderr)


def sweep(
    vector: Annotated[Path, typer.Option(help="Multi-layer vector (compress writes vector_all_layers.safetensors).")],
    model: ModelOption = DEFAULT_MODEL,
    layers: LayersOption = Layers((12,)),
    strengths: Annotated[str, typer.Option(help="Comma list, x residual norm at the layer.")] = "0,0.1,0.2,0.3",
    positions: Annotated[str, typer.Option(help="Comma list of position rules.")] = "prompt_last+generated",
    adaptive: Annotated[
        str,
        typer.Option(
            help="Comma list of strength schedules: constant, until-answer, step-boundaries, entropy, after-setup, "
            "until-thought-ends."
        ),
    ] = "constant",
    prompt_baselines: Annotated[
        str,
        typer.Option(help="Comma list of templates run unsteered on the same problems (the frontier's references)."),
    ] = "concise_prompt,chain_of_draft",
    oracle_samples: Annotated[
        int, typer.Option(min=0, help="Samples per problem for the best-of-N shortest-correct oracle (0: cached only).")
    ] = 0,
    template: str = "baseline",
    dataset: str = "gsm8k",
    split: Annotated[str, typer.Option(help="Tune on train, never on test.")] = "train",
    offset: Annotated[int, typer.Option(min=0, help="Skip this many problems (past the pair problems).")] = 1000,
    limit: Annotated[int, typer.Option(min=1, help="Problems per grid point.")] = 24,
    max_new_tokens: MaxNewTokens = 512,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    seed: SeedOption = 0,
    batch_size: BatchSize = 8,
    dtype: DtypeOption = "auto",
    engine: EngineOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    n_gpu_layers: NGpuLayersOption | None = None,
    ray: RayOption = None,
    ray_actors: RayActorsOption = None,
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = Path("residlab-out"),
) -> None:
    """Accuracy vs tokens over layers x strengths x position rules x adaptive schedules (on a train split by
    default), with the prompt baselines and the best-of-N oracle on the same axes (frontier.png)."""
    from residlab.core.io import check_writable_dir
    from residlab.interventions.positions import STEERING_RULES, validate_rule
    from residlab.methods.asc import run_dir_for
    from residlab.methods.sweep import SweepConfig, run_sweep

    check_writable_dir(run_dir_for(work_dir, model))
    rules = tuple(str(validate_rule(p, STEERING_RULES)) for p in positions.split(","))
    cfg = SweepConfig(
        model=model,
        dtype=dtype,
        engine=engine,
        device=device,
        device_map=device_map,
        n_gpu_layers=n_gpu_layers,
        vector=str(vector),
        layers=tuple(layers),
        strengths=tuple(parse_strength(s) for s in strengths.split(",")),
        positions=rules,
        schedules=tuple(a.strip() for a in adaptive.split(",") if a.strip()),
        prompt_baselines=tuple(t.strip() for t in prompt_baselines.split(",") if t.strip()),
        oracle_samples=oracle_samples,
        template=template,
        dataset=dataset,
        split=split,
        offset=offset,
        limit=limit,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None,
        work_dir=str(work_dir),
    )
    spec = EngineSpec(model, engine, dtype, device, device_map, n_gpu_layers)
    with evaluator_for(spec, ray, ray_actors) as evaluator:
        run_sweep(cfg, log=_log, evaluator=evaluator)


def register(app: typer.Typer) -> None:
    app.command()(handle_errors(compress))
    app.command(name="eval")(handle_errors(evaluate_command))
    app.command()(handle_errors(sweep))
