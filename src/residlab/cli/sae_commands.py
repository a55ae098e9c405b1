"""``residlab sae harvest | train | eval | dashboard | decompose | latent``: sparse autoencoders.

Every command writes into its output folder a ``report.md`` next to its JSON and plots. Harvests go
to ``--work-dir``/stores and are reused by every later command with the same model, layer, site,
corpus and context length; training checkpoints every N steps and resumes after a kill.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from residlab.cli.errors import err_console, handle_errors
from residlab.cli.options import (
    DataDirOption,
    DeviceOption,
    DtypeOption,
    ForceOption,
    ModelOption,
    RayActorsOption,
    RayOption,
    WorkDirOption,
)
from residlab.core.errors import ResidlabError
from residlab.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from residlab.data.corpus import Corpus
    from residlab.models.lm import LanguageModel
    from residlab.saes.activations import ActivationStore
    from residlab.saes.base import SparseAutoencoder
    from residlab.saes.pipeline import HarvestRequest

sae_app = typer.Typer(
    name="sae",
    help="Sparse autoencoders: harvest, train, evaluate, dashboards, decompose vectors.",
    no_args_is_help=True,
)
console = Console(highlight=False, soft_wrap=True)

LayerArg = Annotated[int, typer.Option(help="The layer the SAE reads (negative counts from the end).")]
SiteArg = Annotated[str, typer.Option(help="block, block_input, attn, mlp or mlp_act.")]
CorpusArg = Annotated[str, typer.Option(help="wiki, gsm8k, a .txt/.jsonl file, or hf:NAME[:CONFIG][:SPLIT][:FIELD].")]
ContextArg = Annotated[int, typer.Option(min=2, help="Tokens per window.")]
TokensArg = Annotated[int, typer.Option(min=1, help="Tokens to harvest from the training documents.")]
EvalTokensArg = Annotated[int, typer.Option(min=1, help="Held-out tokens for reconstruction metrics.")]
SaeDirArg = Annotated[Path, typer.Option("--sae", help="An SAE folder written by `residlab sae train`.")]
OutArg = Annotated[Path | None, typer.Option(help="Output folder (default: inside --work-dir).")]
SaeModelArg = Annotated[
    str | None, typer.Option("--model", "-m", help="The model to load (default: the name the SAE recorded).")
]
DEFAULT_WORK = Path("residlab-out/sae")


def _log(message: str) -> None:
    err_console.print(message, markup=False)


def _setup(
    model: str, dtype: str, corpus_spec: str, data_dir: Path | None, device: str = "cpu"
) -> tuple[LanguageModel, Corpus]:
    """The corpus first (a bad path fails before the slow model load), then the model."""
    from residlab.data.corpus import load_corpus
    from residlab.models.loading import load

    corpus = load_corpus(corpus_spec, data_dir=data_dir)
    _log(f"corpus {corpus.name}: {len(corpus.documents)} documents ({corpus.source}; {corpus.licence})")
    return load(model, dtype=dtype, device=device), corpus


def _report(out: Path, title: str, sections: dict[str, Any], files: list[Path]) -> Path:
    from residlab.core.io import atomic_write_text

    lines = [f"# {title}", ""]
    for name, value in sections.items():
        if isinstance(value, dict):
            lines += [f"## {name}", "", "| key | value |", "|---|---|"]
            lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in value.items()]
        else:
            lines += [f"## {name}", "", str(value)]
        lines.append("")
    lines += ["## Files", ""] + [f"- {p.name}" for p in files]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    console.print(f"wrote {path}")
    return path


def _request(lm: LanguageModel, layer: int, site: str, context_len: int, tokens: int) -> HarvestRequest:
    from residlab.saes.pipeline import HarvestRequest

    return HarvestRequest(lm.check_layer(layer), site, context_len, tokens)


def _held_out(
    sae: SparseAutoencoder,
    model_name: str | None,
    dtype: str,
    corpus: str,
    data_dir: Path | None,
    work_dir: Path,
    tokens: int,
    device: str = "cpu",
) -> tuple[LanguageModel, Corpus, HarvestRequest, ActivationStore]:
    """The SAE's model and corpus, and the held-out activations at its hook (harvested once, then reused)."""
    from residlab.saes.pipeline import harvest_split

    hook = sae.cfg.hook
    lm, texts = _setup(model_name or hook.model, dtype, corpus, data_dir, device)
    request = _request(lm, hook.layer, hook.site, sae.cfg.context_len, tokens)
    held, _ = harvest_split(lm, texts, "eval", request, work_dir / "stores")
    return lm, texts, request, held


@sae_app.command()
@handle_errors
def harvest(
    model: ModelOption = DEFAULT_MODEL,
    layer: LayerArg = 12,
    site: SiteArg = "block",
    corpus: CorpusArg = "wiki",
    tokens: TokensArg = 1_000_000,
    eval_tokens: EvalTokensArg = 50_000,
    context_len: ContextArg = 128,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = DEFAULT_WORK,
    ray: RayOption = None,
    ray_actors: RayActorsOption = None,
) -> None:
    """Harvest a layer's activations from the training and held-out documents (resumable)."""
    from residlab.cli.runners import chunk_runner_for
    from residlab.engines import EngineSpec
    from residlab.saes.pipeline import harvest_split

    lm, texts = _setup(model, dtype, corpus, data_dir, device)
    request = _request(lm, layer, site, context_len, tokens)
    held_request = _request(lm, layer, site, context_len, eval_tokens)
    with chunk_runner_for(EngineSpec(model, "torch", dtype, device), ray, ray_actors) as runner:
        train, stats = harvest_split(lm, texts, "train", request, work_dir / "stores", runner=runner)
        held, _ = harvest_split(lm, texts, "eval", held_request, work_dir / "stores", runner=runner)
    facts = {
        "train tokens": train.num_tokens,
        "held-out tokens": held.num_tokens,
        "tokens/s (this run)": stats.tokens_per_s,
    }
    _report(train.folder, f"Harvest of {lm.name} layer {request.layer} {site}", {"harvest": facts}, [])


def _training_curve(model: str, cfg: Any, trained: Any) -> Any:
    """An evaluation result holding only the training history (for its training-curve figure)."""
    from residlab.saes.evaluation import SAEEvalResult

    hook = cfg.hook
    empty = {"density": [0.0]}
    return SAEEvalResult(
        model, hook.layer, hook.site, cfg.arch, None, cfg.d_sae, cfg.k, trained.tokens, empty, {}, {}, trained.history
    )


@sae_app.command()
@handle_errors
def train(
    model: ModelOption = DEFAULT_MODEL,
    layer: LayerArg = 12,
    site: SiteArg = "block",
    corpus: CorpusArg = "wiki",
    arch: Annotated[str, typer.Option(help="topk, batchtopk or vsae.")] = "topk",
    expansion: Annotated[int, typer.Option(min=1, help="Width = expansion x d_model.")] = 8,
    k: Annotated[int, typer.Option(min=1, help="Active latents per token.")] = 32,
    sample: Annotated[bool, typer.Option(help="vSAE: train with posterior sampling.")] = False,
    tokens: TokensArg = 1_000_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 4096,
    lr: Annotated[float | None, typer.Option(help="Default: 2e-4 / sqrt(width / 2^14).")] = None,
    dead_window: Annotated[int, typer.Option(min=1, help="Dead = no firing in this many tokens.")] = 1_000_000,
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 200,
    context_len: ContextArg = 128,
    seed: int = 0,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = DEFAULT_WORK,
    out: OutArg = None,
    force: ForceOption = False,
) -> None:
    """Train an SAE (harvesting first if needed); resumes from the output folder's checkpoint."""
    import shutil

    from residlab.saes import HookPoint, architecture
    from residlab.saes.files import save_sae
    from residlab.saes.pipeline import harvest_split
    from residlab.saes.training import TrainConfig, train_sae

    config_cls = architecture(arch).config_cls
    lm, texts = _setup(model, dtype, corpus, data_dir, device)
    request = _request(lm, layer, site, context_len, tokens)
    store, _ = harvest_split(lm, texts, "train", request, work_dir / "stores")
    options: dict[str, Any] = {"sample": sample} if arch == "vsae" else {}
    if sample and arch != "vsae":
        raise ResidlabError("--sample applies to the variational SAE only.", hint="use --arch vsae.")
    cfg = config_cls(
        d_in=lm.hidden_size,
        d_sae=expansion * lm.hidden_size,
        k=k,
        hook=HookPoint(lm.name, request.layer, site),
        dead_window=dead_window,
        context_len=context_len,
        corpus=texts.name,
        **options,
    )
    run = out or work_dir / "runs" / f"{lm.name}-L{request.layer}-{site}-{arch}{'-sample' if sample else ''}"
    if force and run.exists():
        shutil.rmtree(run)
    settings = TrainConfig(
        total_tokens=store.num_tokens, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every
    )
    trained = train_sae(cfg, store, settings, run)
    save_sae(trained.sae, run / "sae", extra={"train_tokens": trained.tokens})
    files = [p for p in _training_curve(lm.name, cfg, trained).plot(run) if p.name == "training_curve.png"]
    last = trained.history[-1] if trained.history else {}
    facts = {"train tokens": trained.tokens, "tokens/s": trained.tokens_per_s, **last}
    _report(run, f"{arch} SAE on {lm.name} layer {request.layer} {site}", {"training": facts}, files)


@sae_app.command("eval")
@handle_errors
def evaluate(
    sae: SaeDirArg,
    model_name: SaeModelArg = None,
    corpus: CorpusArg = "wiki",
    eval_tokens: EvalTokensArg = 50_000,
    ce_windows: Annotated[int, typer.Option(min=1, help="Held-out windows for the spliced CE.")] = 128,
    train_tokens: Annotated[int, typer.Option(min=1, help="Training tokens averaged for mean ablation.")] = 100_000,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = DEFAULT_WORK,
    out: OutArg = None,
) -> None:
    """Evaluate an SAE on held-out text: FVE/NMSE both ways, L0, density, spliced CE (vSAE: sampling on and off)."""
    from residlab.saes.files import load_sae
    from residlab.saes.pipeline import eval_windows, evaluate_sae, harvest_split

    model = load_sae(sae)
    hook = model.cfg.hook
    lm, texts, request, held = _held_out(model, model_name, dtype, corpus, data_dir, work_dir, eval_tokens, device)
    mean_request = _request(lm, hook.layer, hook.site, model.cfg.context_len, train_tokens)
    mean_store, _ = harvest_split(lm, texts, "train", mean_request, work_dir / "stores")
    windows = eval_windows(lm, texts, request, ce_windows)
    settings = (False, True) if model.cfg.arch == "vsae" else (None,)
    sections, files = {}, []
    for sample in settings:
        started = time.perf_counter()
        result = evaluate_sae(lm, model, held, windows, mean_store.mean(), sample=sample)
        target = (out or sae / "eval") / ("" if sample is None else f"sample_{'on' if sample else 'off'}")
        files += result.save(target)
        sections[f"sample {sample}" if sample is not None else "evaluation"] = result.summary()
        _log(f"evaluated in {time.perf_counter() - started:.0f} s")
    _report(out or sae / "eval", f"Evaluation of {sae}", sections, files)


@sae_app.command()
@handle_errors
def dashboard(
    sae: SaeDirArg,
    model_name: SaeModelArg = None,
    corpus: CorpusArg = "wiki",
    eval_tokens: EvalTokensArg = 50_000,
    latents: Annotated[str | None, typer.Option(help="Comma-separated latents (default: a random sample).")] = None,
    sample: Annotated[int, typer.Option(min=1, help="How many latents when none are named.")] = 48,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = DEFAULT_WORK,
    out: OutArg = None,
) -> None:
    """Write a static HTML dashboard (density, top contexts, logit lens, search)."""
    from residlab.saes.dashboard import DashboardOptions, write_dashboard
    from residlab.saes.files import load_sae

    model = load_sae(sae)
    try:
        chosen = tuple(int(x) for x in latents.split(",")) if latents else ()
    except ValueError:
        raise ResidlabError(f"cannot read --latents {latents!r}.", hint="name latents as numbers: 3,17,402.") from None
    bad = [x for x in chosen if not 0 <= x < model.cfg.d_sae]
    if bad:
        raise ResidlabError(
            f"latents {bad} are outside 0..{model.cfg.d_sae - 1}.", hint="name latents the SAE has (its width)."
        )
    lm, _, _, held = _held_out(model, model_name, dtype, corpus, data_dir, work_dir, eval_tokens, device)
    folder = out or sae / "dashboard"
    page = write_dashboard(lm, model, held, folder / "index.html", DashboardOptions(latents=chosen, sample=sample))
    _report(folder, f"Dashboard of {sae}", {"dashboard": f"open {page.resolve().as_uri()} in a browser"}, [page])


@sae_app.command()
@handle_errors
def decompose(
    sae: SaeDirArg,
    vector: Annotated[Path, typer.Option(help="A steering vector (.safetensors or control-vector .gguf).")],
    model_name: SaeModelArg = None,
    max_latents: Annotated[int, typer.Option(min=1, help="Latents in the sparse fit.")] = 16,
    contexts: Annotated[
        bool, typer.Option(help="Add each latent's top contexts in held-out --corpus text (harvests it once).")
    ] = True,
    corpus: CorpusArg = "wiki",
    eval_tokens: EvalTokensArg = 50_000,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    work_dir: WorkDirOption = DEFAULT_WORK,
    out: OutArg = None,
) -> None:
    """Express a steering vector at the SAE's layer as SAE latents (read-out and sparse non-negative fit),
    each with its logit-lens tokens and (with --contexts) its top contexts in held-out text of --corpus."""
    from residlab.core.io import atomic_write_text
    from residlab.models.loading import load
    from residlab.saes.dashboard import render_dashboard
    from residlab.saes.decompose import decompose_vector
    from residlab.saes.files import load_sae
    from residlab.vectors.files import load_vector

    model = load_sae(sae)
    load_vector(vector)  # a wrong path or file fails before the slow model load and harvest
    if contexts:
        lm, _, _, held = _held_out(model, model_name, dtype, corpus, data_dir, work_dir, eval_tokens, device)
    else:
        lm, held = load(model_name or model.cfg.hook.model, dtype=dtype, device=device), None
    steering = load_vector(vector, lm)
    result = decompose_vector(model, steering, lm=lm, max_latents=max_latents, contexts=held)
    folder = out or sae / "decompositions" / vector.stem
    files = result.save(folder)
    if contexts:  # the page's cards need each latent's density and contexts
        page = folder / "latents.html"
        facts = {"vector": vector.name, "explained": f"{result.explained_fraction:.1%} of |v|^2", "corpus": corpus}
        atomic_write_text(page, render_dashboard(result.fit, f"{vector.name} as latents of {sae.name}", facts))
        files.append(page)
    rows = [
        f"| {r['latent']} | {r['share']:.3f} | {r['cosine']:.3f} | {r.get('density', float('nan')):.2e} | "
        f"{' '.join(map(repr, r.get('promoted', [])[:5]))} | {_top_context(r)} |"
        for r in result.fit
    ]
    header = "| latent | share of norm^2 | cosine | density | promotes | top context (peak in [brackets]) |"
    fit = header + "\n|---|---|---|---|---|---|\n" + "\n".join(rows)
    _report(folder, f"{vector.name} in terms of {sae.name}", {"summary": result.summary(), "sparse fit": fit}, files)


def _top_context(row: dict[str, Any], radius: int = 6) -> str:
    """The latent's strongest held-out context as text, the peak token in brackets (for a table cell)."""
    if not row.get("contexts"):
        return ""
    tokens = row["contexts"][0]["tokens"]
    peak = next((i for i, t in enumerate(tokens) if t[2]), 0)
    shown = tokens[max(0, peak - radius) : peak + radius + 1]
    text = "".join(f"[{t[0]}]" if t[2] else t[0] for t in shown)
    return text.replace("|", "\\|").replace("\n", " ").strip()


@sae_app.command()
@handle_errors
def latent(
    sae: SaeDirArg,
    index: Annotated[int, typer.Option("--latent", help="The latent to turn into a steering vector.")],
    output: Annotated[Path, typer.Option(help="Where to write the vector (.safetensors).")],
    scale: Annotated[float, typer.Option(help="The vector's norm (the decoder direction has norm 1).")] = 1.0,
    model_name: SaeModelArg = None,
    force: ForceOption = False,
) -> None:
    """Save one latent's decoder direction as a steering vector (for generate, eval, both engines, export)."""
    from residlab.core.io import check_output_file
    from residlab.models.loading import load
    from residlab.models.registry import packaged_model
    from residlab.saes.decompose import latent_vector
    from residlab.saes.files import load_sae

    model = load_sae(sae)
    check_output_file(output, overwrite=force)
    name = model_name or model.cfg.hook.model
    shape = packaged_model(name) or load(name)  # a packaged model's shape is known without loading it
    latent_vector(model, index, shape, scale=scale).save(output)
    console.print(f"wrote {output}")
