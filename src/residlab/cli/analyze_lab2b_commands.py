"""``residlab analyze codes | activations | rsparse``: activation codes, activation swaps, R-Sparse.

Each command reads a corpus's train split (calibration, probe training) and its held-out split
(every loss and test accuracy), runs on the model, and writes JSON + PNG plots + a summary table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from residlab.cli.analyze_commands import _fmt, load_for_analysis, report_written
from residlab.cli.errors import handle_errors
from residlab.cli.options import DeviceOption, DtypeOption, ModelOption, OptionalLayersOption
from residlab.core.errors import ResidlabError
from residlab.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

console = Console(highlight=False, soft_wrap=True)

CorpusOption = Annotated[
    str, typer.Option(help="Corpus: wiki (Wikipedia leads), gsm8k, a .txt/.jsonl file or hf:NAME; split train/eval.")
]
TrainTexts = Annotated[int, typer.Option(min=1, help="Documents from the corpus's train split.")]
EvalTexts = Annotated[int, typer.Option(min=1, help="Documents from the corpus's held-out split.")]
MaxTokens = Annotated[int, typer.Option(min=2, help="Cut each text to this many tokens.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Texts per forward pass.")]
Seed = Annotated[int, typer.Option(help="Seed of every random choice.")]
Out = Annotated[Path | None, typer.Option(help="Output folder (default: ./residlab-out/analyses/<model>/<analysis>).")]


@dataclass(frozen=True)
class _Run:
    lm: LanguageModel
    train: list[str]
    evaluation: list[str]
    out_dir: Path
    started: float

    def finish(self, paths: list[Path]) -> None:
        """Print where the results went."""
        report_written(paths, self.started)


def _start(
    analysis: str, model: str, corpus: str, train: int, evaluation: int, dtype: str, out: Path | None, device: str
) -> _Run:
    """Read the corpus and load the model (the corpus first: a bad name fails before a slow load)."""
    from residlab.analyses.heldout import corpus_texts

    started = time.perf_counter()
    train_texts, eval_texts = corpus_texts(corpus, train, evaluation)
    note = f"{len(train_texts)} train / {len(eval_texts)} held-out texts"
    lm, out_dir = load_for_analysis(analysis, model, dtype, device, out, note)
    return _Run(lm, train_texts, eval_texts, out_dir, started)


def _activation(name: str) -> str | Callable:
    """A built-in activation name, or ``package.module:function`` imported as a callable."""
    if ":" not in name:
        return name
    import importlib

    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ResidlabError(
            f"cannot import {name!r}.", hint="use package.module:function (on the Python path)."
        ) from None
    if not callable(fn):
        raise ResidlabError(f"{name!r} is not callable.", hint="name a Tensor -> Tensor function.")
    return fn


def codes(
    model: ModelOption = DEFAULT_MODEL,
    corpus: CorpusOption = "wiki",
    train_texts: TrainTexts = 48,
    test_texts: EvalTexts = 16,
    max_tokens: MaxTokens = 64,
    batch_size: BatchSize = 8,
    layers: OptionalLayersOption = None,
    k: Annotated[int, typer.Option(min=1, help="Neighbours of the Hamming k-NN.")] = 9,
    top_classes: Annotated[int, typer.Option(min=2, help="Most frequent train token ids the probes classify.")] = 64,
    max_iter: Annotated[int, typer.Option(min=1, help="Steps of each logistic regression.")] = 100,
    seed: Seed = 0,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """MLP sign codes per layer: redundancy, and the current / next token predicted from codes alone."""
    from residlab.analyses.codes import analyze_codes

    run = _start("codes", model, corpus, train_texts, test_texts, dtype, out, device)
    result = analyze_codes(
        run.lm,
        run.train,
        run.evaluation,
        layers=list(layers) if layers else None,
        max_tokens=max_tokens,
        batch_size=batch_size,
        k=k,
        top_classes=top_classes,
        max_iter=max_iter,
        seed=seed,
    )
    paths = result.save(run.out_dir)
    table = Table(
        title=f"{result.model}: MLP sign codes ({result.bits} bits; {result.train_tokens} train / "
        f"{result.test_tokens} test tokens)",
        caption=(
            f"test accuracy on the {result.top_classes} most frequent train ids; majority class: current "
            f"{_fmt(result.majority['current'])}, next {_fmt(result.majority['next'])}; the model's own next-token "
            f"top-1: {_fmt(result.model_next_accuracy)}"
        ),
    )
    for column in (
        "layer",
        "redund.",
        "ambig.",
        "on",
        "kNN cur",
        "LR cur",
        "rand cur",
        "kNN next",
        "LR next",
        "rand next",
    ):
        table.add_column(column, justify="right")
    for i, layer in enumerate(result.layers):
        table.add_row(
            str(layer),
            _fmt(result.redundancy[i]),
            _fmt(result.ambiguous[i]),
            _fmt(result.firing_rate[i], ".2f"),
            _fmt(result.knn["current"][i]),
            _fmt(result.logreg["current"][i]),
            _fmt(max(result.random_knn["current"][i], result.random_logreg["current"][i])),
            _fmt(result.knn["next"][i]),
            _fmt(result.logreg["next"][i]),
            _fmt(max(result.random_knn["next"][i], result.random_logreg["next"][i])),
        )
    console.print(table)
    run.finish(paths)


def activations(
    model: ModelOption = DEFAULT_MODEL,
    swap: Annotated[
        str, typer.Option("--activations", help="Comma-separated: relu, gelu, gelu_tanh, silu, crrelu, or module:fn.")
    ] = "relu,gelu,silu,crrelu",
    layers: OptionalLayersOption = None,
    calibrate: Annotated[bool, typer.Option(help="Fit one scale per layer on train texts, then measure again.")] = True,
    corpus: CorpusOption = "wiki",
    train_texts: TrainTexts = 16,
    eval_texts: EvalTexts = 32,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """Swap each MLP's activation function (all layers or some) and report the held-out loss change."""
    from residlab.analyses.activation_swaps import analyze_activations

    names = [_activation(x.strip()) for x in swap.split(",") if x.strip()]
    run = _start("activations", model, corpus, train_texts, eval_texts, dtype, out, device)
    result = analyze_activations(
        run.lm,
        run.evaluation,
        run.train,
        activations=names,
        layers=list(layers) if layers else None,
        calibrate=calibrate,
        max_tokens=max_tokens,
        batch_size=batch_size,
    )
    paths = result.save(run.out_dir)
    table = Table(
        title=f"{result.model} ({result.activation}): activation swaps at {len(result.layers)} layers, "
        f"{result.eval_tokens} held-out tokens",
        caption=f"baseline CE {result.baseline_ce:.4f} nats (perplexity {result.baseline_perplexity:.2f}); "
        "deviation = mean over layers of ||f(x) - g(x)|| / ||g(x)||",
    )
    for column in ("activation", "CE", "delta CE", "ppl", "scaled delta CE", "mean scale", "deviation", "zeros"):
        table.add_column(column, justify="right")
    for s in result.swaps:
        table.add_row(
            s.name,
            _fmt(s.ce, ".4f"),
            _fmt(s.delta_ce, "+.4f"),
            _fmt(s.perplexity, ".2f"),
            _fmt(s.calibrated_delta_ce, "+.4f"),
            _fmt(sum(s.scales) / len(s.scales) if s.scales else None),
            _fmt(sum(s.rel_deviation) / len(s.rel_deviation)),
            _fmt(sum(s.zero_fraction) / len(s.zero_fraction)),
        )
    console.print(table)
    run.finish(paths)


def rsparse(
    model: ModelOption = DEFAULT_MODEL,
    sparsity: Annotated[float, typer.Option(min=0.0, max=0.99, help="Fraction of the dense MACs saved.")] = 0.5,
    uniform_alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="The 'uniform' variant's alpha.")] = 0.9,
    layers: OptionalLayersOption = None,
    search_tokens: Annotated[int, typer.Option(min=1, help="Train tokens per linear for the alpha search.")] = 256,
    speed: Annotated[bool, typer.Option(help="Time one layer's linears, dense vs sparse, for one token.")] = True,
    speed_threads: Annotated[int, typer.Option(min=1, help="Threads for the timing.")] = 1,
    corpus: CorpusOption = "wiki",
    train_texts: TrainTexts = 16,
    eval_texts: EvalTexts = 32,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    out: Out = None,
) -> None:
    """R-Sparse: sparse + low-rank linear inputs at a target sparsity vs dense, top-k, low-rank and CETT."""
    from residlab.analyses.rsparse import analyze_rsparse

    run = _start("rsparse", model, corpus, train_texts, eval_texts, dtype, out, device)
    result = analyze_rsparse(
        run.lm,
        run.train,
        run.evaluation,
        sparsity=sparsity,
        uniform_alpha=uniform_alpha,
        layers=list(layers) if layers else None,
        search_tokens=search_tokens,
        max_tokens=max_tokens,
        batch_size=batch_size,
        speed=speed,
        speed_threads=speed_threads,
        seed=seed,
    )
    paths = result.save(run.out_dir)
    table = Table(
        title=f"{result.model}: R-Sparse at {100 * result.sparsity:g}% sparsity, {result.eval_tokens} held-out tokens",
        caption=f"dense perplexity {result.dense_perplexity:.3f}; alpha searched on {result.search_tokens} train "
        "tokens per linear",
    )
    for column in ("variant", "layers", "perplexity", "increase %", "MACs kept", "what"):
        table.add_column(column, justify="right")
    for v in result.variants:
        table.add_row(
            v.name,
            v.touched,
            _fmt(v.perplexity),
            _fmt(v.ppl_increase_percent, "+.2f"),
            _fmt(v.macs_kept, ".3f"),
            v.description,
        )
    console.print(table)
    s = result.summary()
    for variant in dict.fromkeys(row.variant for row in result.speed):
        console.print(
            f"layer {result.speed_layer}'s linears, one token, {result.speed_threads} thread(s), {variant} alpha: "
            f"dense {s[f'layer_dense_us_{variant}']:.0f} us, sparse {s[f'layer_sparse_us_{variant}']:.0f} us "
            f"(speed-up {s[f'layer_speedup_{variant}']:.2f}x)"
        )
    run.finish(paths)


def register(analyze_app: typer.Typer) -> None:
    """Add ``codes``, ``activations`` and ``rsparse`` to the ``residlab analyze`` group."""
    for command in (codes, activations, rsparse):
        analyze_app.command()(handle_errors(command))
