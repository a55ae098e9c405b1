"""``residlab analyze cka | guidance | residual | criticality``, registered onto the ``analyze`` group.

Without ``--text-file`` the texts are held-out documents of the ``wiki`` corpus (its eval split), so
no loss is ever measured on text a calibration or training step saw.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from residlab.cli.analyze_commands import (
    BatchSize,
    FirstPosition,
    Limit,
    MaxTokens,
    Out,
    TextFile,
    _fmt,
    _log,
    _Run,
    analyze_app,
    console,
    load_for_analysis,
)
from residlab.cli.errors import handle_errors
from residlab.cli.options import DeviceOption, DtypeOption, ModelOption
from residlab.core.errors import ResidlabError
from residlab.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from residlab.analyses.guidance_result import GuidanceResult

Seed = Annotated[int, typer.Option(help="Seed of every random choice (shuffles, fresh weights, perturbations).")]


def _floats(value: str, option: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ResidlabError(
            f"bad {option} {value!r}.", hint="pass numbers separated by commas, such as 0,0.5,1."
        ) from None


def _begin(
    analysis: str, model: str, text_file: Path | None, limit: int | None, dtype: str, out: Path | None, device: str
) -> _Run:
    """Texts (a file, or held-out wiki documents), then the model; fails on bad input before the slow load."""
    from residlab.data.texts import read_texts

    started = time.perf_counter()
    if text_file is not None:
        texts = read_texts(text_file, limit=limit)
    else:
        from residlab.data.corpus import load_corpus

        texts = list(load_corpus("wiki").split("eval")[: limit or 24])
    lm, out_dir = load_for_analysis(analysis, model, dtype, device, out, f"{len(texts)} texts")
    return _Run(lm, texts, out_dir, started)


@analyze_app.command()
@handle_errors
def cka(
    model: ModelOption = DEFAULT_MODEL,
    other: Annotated[
        str | None, typer.Option("--other", help="A second model: compare the two per word (else within --model).")
    ] = None,
    text_file: TextFile = None,
    limit: Limit = None,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    minibatch: Annotated[int, typer.Option(min=4, help="Examples per CKA minibatch (HSIC summed over them).")] = 256,
    first_position: FirstPosition = 1,
    seed: Seed = 0,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """Layer x layer linear CKA (biased and debiased) within a model or between two on the same text."""
    from residlab.analyses.cka import analyze_cka
    from residlab.models.loading import load

    run = _begin("cka", model, text_file, limit, dtype, out, device)
    second = load(other, dtype=dtype, device=device) if other else None
    result = analyze_cka(
        run.lm, run.texts, second, max_tokens=max_tokens, batch_size=batch_size, minibatch=minibatch,
        first_position=first_position, seed=seed, log=_log,
    )  # fmt: skip
    out_dir = run.out_dir if second is None or out is not None else run.out_dir.parent / f"cka_vs_{second.name}"
    paths = result.save(out_dir)
    s = result.summary()
    table = Table(title=f"{result.model_a} vs {result.model_b}: linear CKA ({result.num_examples} {result.unit}s)")
    for column in ("layer", "mapped to", "biased", "debiased", "best match (debiased)"):
        table.add_column(column, justify="right")
    for i, j in enumerate(result.mapping):
        table.add_row(
            str(i), str(j), _fmt(result.biased[i][j]), _fmt(result.debiased[i][j]), str(s["best_match_debiased"][i])
        )
    console.print(table)
    console.print(
        f"mean CKA along the even-stride mapping: biased {_fmt(s['mapped_mean_biased'])}, "
        f"debiased {_fmt(s['mapped_mean_debiased'])}"
    )
    if "off_diagonal_mean_biased" in s:
        console.print(
            f"off-diagonal mean: biased {_fmt(s['off_diagonal_mean_biased'])}, debiased "
            f"{_fmt(s['off_diagonal_mean_debiased'])}; adjacent layers {_fmt(s['adjacent_mean_debiased'])} (debiased)"
        )
    run.finish(paths)


def _guidance_table(result: GuidanceResult) -> Table:
    table = Table(
        title=f"guidance: {result.config['target']} target, guide {result.guide} layers {result.guide_layers}"
    )
    for column in ("condition", "seed", "held-out CE (start)", "final", "best", "final CKA (debiased) per layer", "s"):
        table.add_column(column, justify="right")
    for r in result.runs:
        cka_values = " ".join(_fmt(v, ".2f") for v in r.cka_debiased[-1])
        table.add_row(
            r.condition,
            str(r.seed),
            _fmt(r.eval_ce[0]),
            _fmt(r.eval_ce[-1]),
            _fmt(min(r.eval_ce)),
            cka_values,
            f"{r.seconds:.0f}",
        )
    return table


@analyze_app.command()
@handle_errors
def guidance(
    guide: Annotated[str, typer.Option("--guide", help="The frozen guide model (packaged name, dir or hub id).")] = (
        "smollm2-135m-instruct"
    ),
    target: Annotated[str, typer.Option(help="Target network trained from scratch: rnn or transformer.")] = "rnn",
    corpus: Annotated[str, typer.Option(help="Training corpus (its train split; eval split held out).")] = "wiki",
    steps: Annotated[int, typer.Option(min=1, help="Training steps per run.")] = 500,
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated (one run per seed and condition).")] = "0,1,2",
    conditions: Annotated[str, typer.Option(help="baseline, guided, guided_untrained.")] = "baseline,guided",
    layers: Annotated[int, typer.Option(min=1, help="Target layers.")] = 3,
    width: Annotated[int, typer.Option(min=4, help="Target width.")] = 128,
    vocab: Annotated[
        int, typer.Option(min=2, help="Target vocabulary: the most frequent train tokens + other.")
    ] = 2048,
    seq_len: Annotated[int, typer.Option(min=8, help="Tokens per training window.")] = 64,
    train_windows: Annotated[int, typer.Option(min=1, help="Training windows (guide states cached for each).")] = 1024,
    eval_windows: Annotated[int, typer.Option(min=1, help="Held-out windows.")] = 64,
    batch_size: Annotated[int, typer.Option(min=2, help="Windows per step.")] = 16,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 2e-3,
    weight: Annotated[float, typer.Option(min=0.0, help="Weight of the guidance term.")] = 1.0,
    debiased: Annotated[bool, typer.Option(help="Debiased CKA in the loss (the paper uses the biased one).")] = False,
    eval_every: Annotated[int, typer.Option(min=1, help="Measure held-out CE and CKA every N steps.")] = 25,
    work_dir: Annotated[Path, typer.Option(help="Finished runs are kept (and reused) here.")] = Path(
        "residlab-out/guidance"
    ),
    out: Out = None,
) -> None:
    """Train a small network from scratch with and without CKA guidance from a packaged model's layers."""
    from residlab.analyses.guidance_experiment import GuidanceConfig, run_guidance_experiment
    from residlab.models.loading import load

    started = time.perf_counter()
    cfg = GuidanceConfig(
        target=target, guide=guide, corpus=corpus, seq_len=seq_len, train_windows=train_windows,
        eval_windows=eval_windows, vocab=vocab, width=width, layers=layers, steps=steps, batch_size=batch_size,
        lr=lr, weight=weight, debiased=debiased, eval_every=eval_every,
        seeds=tuple(int(s) for s in _floats(seeds, "--seeds")),
        conditions=tuple(c.strip() for c in conditions.split(",") if c.strip()),
    )  # fmt: skip
    cfg.check()
    lm = load(guide)
    result = run_guidance_experiment(lm, cfg, work_dir, log=_log)
    paths = result.save(out if out is not None else work_dir / "result")
    console.print(_guidance_table(result))
    s = result.summary()
    for condition in cfg.conditions:
        if condition != "baseline" and f"{condition}_minus_baseline_final_ce" in s:
            console.print(
                f"{condition} - baseline, final held-out CE: {s[f'{condition}_minus_baseline_final_ce']:+.4f} "
                f"(sd {_fmt(s[f'{condition}_minus_baseline_sd'])}); better in {s[f'{condition}_seeds_better']} of "
                f"{s['num_seeds']} seeds"
            )
    _Run(lm, [], paths[0].parent, started).finish(paths)


@analyze_app.command()
@handle_errors
def residual(
    model: ModelOption = DEFAULT_MODEL,
    text_file: TextFile = None,
    limit: Limit = 8,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    first_position: FirstPosition = 1,
    alphas: Annotated[str, typer.Option(help="Scales of every branch in every layer ('' = none).")] = (
        "0,0.1,0.2,0.3,0.5,0.7,0.85,1,1.15,1.3,1.5"
    ),
    range_alphas: Annotated[
        str, typer.Option(help="Scales of one depth range's branches ('' = none).")
    ] = "0,0.3,0.7,1.3",
    ranges: Annotated[int, typer.Option(min=1, help="Depth ranges for --range-alphas (3: early/middle/late).")] = 3,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """Branch / skip norm ratios, residual-norm growth and an inference-time alpha sweep against held-out CE."""
    from residlab.analyses.residual_scaling import analyze_residual

    run = _begin("residual", model, text_file, limit, dtype, out, device)
    result = analyze_residual(
        run.lm, run.texts, max_tokens=max_tokens, batch_size=batch_size, first_position=first_position,
        alphas=_floats(alphas, "--alphas"), range_alphas=_floats(range_alphas, "--range-alphas"), ranges=ranges,
        log=_log,
    )  # fmt: skip
    paths = result.save(run.out_dir)
    table = Table(title=f"{result.model}: residual branches ({result.num_tokens} tokens, position 0 excluded)")
    for column in ("layer", "||a||/||h||", "||m||/||skip||", "||dh||/||h||", "||h_out||/||h||", "mean ||h||"):
        table.add_column(column, justify="right")
    for i in range(result.num_layers):
        table.add_row(
            str(i), _fmt(result.attn_ratio[i]), _fmt(result.mlp_ratio[i]), _fmt(result.block_ratio[i]),
            _fmt(result.growth[i]), _fmt(result.skip_norm[i], ".1f"),
        )  # fmt: skip
    console.print(table)
    for curve in result.sweeps:
        points = ", ".join(f"{a:g}: {c:.3f}" for a, c in zip(curve.alphas, curve.ce, strict=True))
        console.print(f"CE vs alpha, {curve.name} (layers {curve.start}-{curve.stop - 1}): {points}")
    s = result.summary()
    console.print(
        f"fitted norm growth {s['fitted_growth_per_layer']:.3f}x per layer "
        f"(GPT-2 XL: {s['gpt2_xl_growth_per_layer']}x); "
        f"median branch/skip: attention {_fmt(s['median_attn_ratio'])}, MLP {_fmt(s['median_mlp_ratio'])}; "
        f"{100 * s['fraction_of_branches_in_inception_range']:.0f}% of branches in Inception-ResNet's 0.1-0.3"
    )
    run.finish(paths)


@analyze_app.command()
@handle_errors
def criticality(
    model: ModelOption = DEFAULT_MODEL,
    text_file: TextFile = None,
    limit: Limit = 8,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    first_position: FirstPosition = 1,
    eps: Annotated[float, typer.Option(min=0.0, help="Relative size of the input perturbation.")] = 1e-3,
    init_range: Annotated[
        float | None, typer.Option(min=0.0, help="Std of the fresh weights (default: the config's initializer_range).")
    ] = None,
    seed: Seed = 0,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """Preactivation variance and residual-norm growth with depth: trained model vs the same architecture at init."""
    from residlab.analyses.criticality import analyze_criticality

    run = _begin("criticality", model, text_file, limit, dtype, out, device)
    result = analyze_criticality(
        run.lm, run.texts, max_tokens=max_tokens, batch_size=batch_size, first_position=first_position, eps=eps,
        seed=seed, initializer_range=init_range, log=_log,
    )  # fmt: skip
    paths = result.save(run.out_dir)
    table = Table(title=f"{result.model}: trained | fresh init (seed {result.seed}), {result.num_tokens} tokens")
    for column in ("layer", "E[z^2]", "E[z^2] init", "RMS", "RMS init", "growth", "growth init", "gain", "gain init"):
        table.add_column(column, justify="right")
    t, f = result.trained, result.fresh
    for i in range(result.num_layers):
        table.add_row(
            str(i), _fmt(t.preact_second_moment[i], ".3g"), _fmt(f.preact_second_moment[i], ".3g"),
            _fmt(t.residual_rms[i], ".3g"), _fmt(f.residual_rms[i], ".3g"), _fmt(t.growth[i]), _fmt(f.growth[i]),
            _fmt(t.perturbation_gain[i], ".3g"), _fmt(f.perturbation_gain[i], ".3g"),
        )  # fmt: skip
    console.print(table)
    s = result.summary()
    console.print(
        f"residual RMS ~ layer^{_fmt(s['trained_residual_rms_power_law_exponent'], '.2f')} trained, "
        f"^{_fmt(s['fresh_residual_rms_power_law_exponent'], '.2f')} at init; preactivation factor per layer "
        f"{_fmt(s['trained_preact_factor_per_layer'])} trained, {_fmt(s['fresh_preact_factor_per_layer'])} at init"
    )
    run.finish(paths)
