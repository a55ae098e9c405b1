"""``residlab analyze depth | sparsity | dims``: residual-stream analyses, written as JSON + PNG plots."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from residlab.cli.errors import err_console, handle_errors
from residlab.cli.options import DeviceOption, DtypeOption, ModelOption
from residlab.core.errors import ResidlabError
from residlab.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

analyze_app = typer.Typer(
    name="analyze",
    help="Residual-stream analyses: depth usage, activation sparsity, hidden dimensions, factual recall, CKA and "
    "guidance, residual scaling, criticality, activation codes and swaps, R-Sparse.",
    no_args_is_help=True,
)
console = Console(highlight=False, soft_wrap=True)

TextFile = Annotated[
    Path | None,
    typer.Option(help="Texts to analyse: one per non-empty line, or a .jsonl file (its 'question' field, as GSM8K)."),
]
Limit = Annotated[int | None, typer.Option(min=1, help="Use the first N texts.")]
MaxTokens = Annotated[int, typer.Option(min=2, help="Cut each text to this many tokens.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Texts per forward pass.")]
Out = Annotated[Path | None, typer.Option(help="Output folder (default: ./residlab-out/analyses/<model>/<analysis>).")]
FirstPosition = Annotated[
    int, typer.Option(min=0, help="Average over positions >= this (1 leaves out the first token, an attention sink).")
]


def _log(message: str) -> None:
    err_console.print(message, markup=False)


@dataclass(frozen=True)
class _Run:
    """What every analysis starts from: the model, its texts, where results go and when it started."""

    lm: LanguageModel
    texts: list[str]
    out_dir: Path
    started: float

    def finish(self, paths: list[Path]) -> None:
        """Print where the results went."""
        report_written(paths, self.started)


def report_written(paths: list[Path], started: float) -> None:
    """Print where an analysis's results went and how long it took."""
    console.print(f"wrote {len(paths)} files to {paths[0].parent} in {time.perf_counter() - started:.0f} s:")
    for path in paths:
        console.print(f"  {path}")


def load_for_analysis(
    analysis: str, model: str, dtype: str, device: str, out: Path | None, texts_note: str
) -> tuple[LanguageModel, Path]:
    """Check the output folder, load the model (after the texts were read: a bad file fails before a
    slow load) and say so; returns the model and the analysis's output folder."""
    from residlab.analyses.common import safe_name
    from residlab.core.io import check_writable_dir
    from residlab.models.loading import load

    check_writable_dir(out if out is not None else Path("residlab-out") / "analyses")  # before the slow part
    loading = time.perf_counter()
    lm = load(model, dtype=dtype, device=device)
    _log(f"loaded {lm.name} ({lm.num_layers} layers) in {time.perf_counter() - loading:.1f} s; {texts_note}")
    return lm, out if out is not None else Path("residlab-out") / "analyses" / safe_name(lm.name) / analysis


def _start(
    analysis: str, model: str, text_file: Path | None, limit: int | None, dtype: str, out: Path | None, device: str
) -> _Run:
    """Read the texts and load the model (texts first: a bad file fails before a slow load)."""
    from residlab.data.texts import read_texts

    started = time.perf_counter()
    if text_file is None:
        raise ResidlabError(
            "no texts to analyse.",
            hint="pass --text-file FILE (one text per line, or a .jsonl such as GSM8K's test.jsonl).",
        )
    texts = read_texts(text_file, limit=limit)
    lm, out_dir = load_for_analysis(analysis, model, dtype, device, out, f"{len(texts)} texts")
    return _Run(lm, texts, out_dir, started)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, spec)


@analyze_app.command()
@handle_errors
def depth(
    model: ModelOption = DEFAULT_MODEL,
    text_file: TextFile = None,
    limit: Limit = None,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    first_position: FirstPosition = 1,
    skip: Annotated[bool, typer.Option(help="Measure the layer-skip matrix (one extra pass per layer).")] = True,
    skip_texts: Annotated[int | None, typer.Option(min=1, help="Skip matrix on the first N texts only.")] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """Per-layer contributions, the effect of skipping each layer on later ones, and the logit lens."""
    from residlab.analyses.depth import analyze_depth

    run = _start("depth", model, text_file, limit, dtype, out, device)
    result = analyze_depth(
        run.lm,
        run.texts,
        max_tokens=max_tokens,
        batch_size=batch_size,
        first_position=first_position,
        skip=skip,
        skip_texts=skip_texts,
        log=_log,
    )
    paths = result.save(run.out_dir)
    future = result.future_effect()
    mlp = "||m||/||h||" if result.parallel_residual else "||m||/||h+a||"
    table = Table(
        title=f"{result.model}: depth usage ({result.num_texts} texts, {result.num_tokens} tokens)",
        caption=(
            f"attn ||a||/||h||, mlp {mlp}, block ||h_out-h||/||h||, cos = cos(h_out-h, h); skip>later = mean "
            "relative change of later layers' contributions when this layer is skipped, skip>out = max_pos "
            "||delta p||_2; lens KL(lens || output) in nats, top5 = overlap with the output's top 5"
        ),
    )
    for column in ("layer", "attn", "mlp", "block", "cos", "skip>later", "skip>out", "lens KL", "top5"):
        table.add_column(column, justify="right")
    for i in range(result.num_layers):
        table.add_row(
            str(i),
            _fmt(result.attn_rel[i]),
            _fmt(result.mlp_rel[i]),
            _fmt(result.block_rel[i]),
            _fmt(result.block_cos[i], "+.2f"),
            _fmt(future[i]) if future else "-",
            _fmt(result.skip_output_l2[i]) if result.skip_output_l2 else "-",
            _fmt(result.lens_kl[i], ".2f"),
            _fmt(result.lens_top5[i], ".2f"),
        )
    console.print(table)
    s = result.summary()
    console.print(
        f"block contribution, mean of {s['halves']}: {_fmt(s['block_rel_first_half'])} / "
        f"{_fmt(s['block_rel_second_half'])}; logit-lens KL drops most at layer {s['lens_kl_steepest_drop_layer']}, "
        f"falls below half its peak at layer {s['lens_kl_below_half_of_peak_layer']}"
    )
    if "future_effect_first_half" in s:
        console.print(
            f"skipping a layer: mean effect on later layers {_fmt(s['future_effect_first_half'])} / "
            f"{_fmt(s['future_effect_second_half'])}, output KL {_fmt(s['output_kl_first_half'])} / "
            f"{_fmt(s['output_kl_second_half'])} (same halves)"
        )
    for note in result.notes:
        console.print(f"note: {note}")
    run.finish(paths)


@analyze_app.command()
@handle_errors
def sparsity(
    model: ModelOption = DEFAULT_MODEL,
    text_file: TextFile = None,
    limit: Limit = None,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    first_position: FirstPosition = 1,
    threshold: Annotated[float, typer.Option(min=0.0, help="|a| above this counts as active (non-ReLU).")] = 0.01,
    temporal_tau: Annotated[
        float, typer.Option(min=0.0, help="A delta is ~0 if |x_t - x_t-1| <= tau * mean|x_t|.")
    ] = 0.1,
    cett_targets: Annotated[str, typer.Option(help="CETT values for the per-layer thresholds.")] = "0.1,0.2,0.3",
    ppl_percent: Annotated[float, typer.Option(min=0.0, help="p of the PPL-p% sparsity.")] = 1.0,
    ppl_tolerance: Annotated[float, typer.Option(min=0.0, help="Search stops within tolerance * p points.")] = 0.1,
    max_search_steps: Annotated[int, typer.Option(min=1, help="Forward passes of the PPL search, at most.")] = 10,
    calibration_tokens: Annotated[int, typer.Option(min=1, help="Tokens for the per-layer CETT thresholds.")] = 256,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """MLP activation sparsity: nonzero %, CETT and PPL-p% sparsity, temporal sparsity."""
    from residlab.analyses.sparsity import analyze_sparsity

    try:
        targets = [float(x) for x in cett_targets.split(",") if x.strip()]
    except ValueError:
        raise ResidlabError(f"bad --cett-targets {cett_targets!r}.", hint="pass numbers such as 0.1,0.2,0.3.") from None
    run = _start("sparsity", model, text_file, limit, dtype, out, device)
    result = analyze_sparsity(
        run.lm,
        run.texts,
        max_tokens=max_tokens,
        batch_size=batch_size,
        first_position=first_position,
        threshold=threshold,
        temporal_tau=temporal_tau,
        cett_targets=targets,
        ppl_percent=ppl_percent,
        ppl_tolerance=ppl_tolerance,
        max_search_steps=max_search_steps,
        calibration_tokens=calibration_tokens,
        log=_log,
    )
    paths = result.save(run.out_dir)
    p = f"{result.ppl_percent:g}"
    table = Table(
        title=f"{result.model} ({result.activation}): MLP sparsity, {result.num_tokens} tokens",
        caption=(
            f"% of MLP activations: a!=0, |a|>{result.threshold:g}; % dropped (output norm <= the layer's threshold) "
            f"at each CETT and at the PPL+{p}% point; % of consecutive-token deltas <= {result.temporal_tau:g} "
            "mean|x| (MLP activation, residual)"
        ),
    )
    columns = ["layer", "a!=0", f"|a|>{result.threshold:g}"]
    columns += [f"CETT {t:g}" for t in result.cett_targets]
    columns += [f"PPL+{p}%", "delta mlp", "delta resid"]
    for column in columns:
        table.add_column(column, justify="right")
    for i in range(result.num_layers):
        table.add_row(
            str(i),
            _fmt(100 * result.nonzero_exact[i], ".1f"),
            _fmt(100 * result.nonzero_above[i], ".1f"),
            *[_fmt(100 * result.cett_sparsity[f"{t:g}"][i], ".1f") for t in result.cett_targets],
            _fmt(100 * result.ppl_layer_sparsity[i], ".1f"),
            _fmt(100 * result.temporal_mlp[i], ".1f"),
            _fmt(100 * result.temporal_residual[i], ".1f"),
        )
    console.print(table)
    console.print("(all columns in %)")
    console.print(
        f"PPL-{p}% sparsity: {100 * result.ppl_sparsity:.1f}% of activations dropped at CETT {result.ppl_cett:.4f} "
        f"(perplexity {result.baseline_ppl:.3f} -> {result.ppl_increase_percent:+.2f}%"
        f"{'' if result.ppl_converged else ', search did not reach the tolerance'})"
    )
    run.finish(paths)


@analyze_app.command()
@handle_errors
def dims(
    model: ModelOption = DEFAULT_MODEL,
    text_file: TextFile = None,
    limit: Limit = None,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    first_position: FirstPosition = 1,
    top_k_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Top-k dims for the overlap, as a fraction of d.")
    ] = 0.1,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """Hidden-dimension concentration: dims holding 50% / 90% of the L1 mass, top-k overlap of neighbours."""
    from residlab.analyses.dims import analyze_dims

    run = _start("dims", model, text_file, limit, dtype, out, device)
    result = analyze_dims(
        run.lm,
        run.texts,
        max_tokens=max_tokens,
        batch_size=batch_size,
        first_position=first_position,
        top_k_fraction=top_k_fraction,
        log=_log,
    )
    paths = result.save(run.out_dir)
    table = Table(title=f"{result.model}: hidden-dimension concentration (d = {result.hidden_size})")
    for column in ("layer", "% dims 50% mass", "% dims 90% mass", f"top-{result.top_k} Jaccard", "shared dims"):
        table.add_column(column, justify="right")
    for i in range(result.num_layers):
        table.add_row(
            str(i),
            _fmt(100 * result.frac50[i], ".2f"),
            _fmt(100 * result.frac90[i], ".1f"),
            _fmt(result.jaccard[i]),
            str(result.shared_dims[i]),
        )
    console.print(table)
    console.print(
        f"references: random top-{result.top_k} subsets overlap {result.random_jaccard:.3f}; an i.i.d. Gaussian "
        f"vector needs {100 * result.gaussian_frac50:.1f}% / {100 * result.gaussian_frac90:.1f}% of its dims"
    )
    run.finish(paths)
