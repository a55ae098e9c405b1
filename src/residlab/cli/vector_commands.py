"""``residlab vector``: inspect steering vectors and convert them to and from llama.cpp control vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from residlab.cli.errors import handle_errors
from residlab.cli.options import ForceOption, OptionalLayersOption

vector_app = typer.Typer(help="Inspect steering vectors; convert to and from llama.cpp control-vector GGUF files.")
console = Console(highlight=False, soft_wrap=True)


@vector_app.command("show")
@handle_errors
def show(path: Annotated[Path, typer.Argument(help="A .safetensors or control-vector .gguf file.")]) -> None:
    """Print a vector's model, layers, norms, position rule and provenance."""
    from residlab.vectors.files import load_vector

    vec = load_vector(path)
    console.print(f"model: {vec.model_name} (hidden size {vec.hidden_size}, {vec.num_layers} layers)")
    console.print("norms: " + ", ".join(f"layer {k}: {v:.4g}" for k, v in vec.norms.items()))
    console.print(f"position rule: {vec.position_rule}\nsource: {vec.source}\ncreated: {vec.created}")
    if vec.info:
        console.print(f"info: {dict(vec.info)}")


@vector_app.command("export")
@handle_errors
def export(
    source: Annotated[Path, typer.Argument(help="A residlab .safetensors vector.")],
    target: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    scale: Annotated[
        float | None, typer.Option(help="Multiply the directions (default: the strength recorded in the vector, or 1).")
    ] = None,
    layers: OptionalLayersOption = None,
    model_hint: Annotated[str, typer.Option(help="llama.cpp architecture name for the file (e.g. qwen2).")] = "",
    force: ForceOption = False,
) -> None:
    """Write a llama.cpp control vector (for `llama-cli --control-vector FILE`, llama-cpp-python, repeng)."""
    from residlab.core.io import check_output_file
    from residlab.vectors.gguf_control import export_control_vector
    from residlab.vectors.steering_vector import SteeringVector

    check_output_file(target, inputs=(source,), overwrite=force)
    vec = SteeringVector.load(source)
    if layers:
        vec = vec.select(list(layers))
    out = export_control_vector(vec, target, scale=scale, model_hint=model_hint)
    used = scale if scale is not None else float(vec.info.get("strength", 1.0))
    console.print(
        f"wrote {out} (layers {vec.layers}, scale {used:.4g}); llama.cpp adds direction.N to the output of block N, "
        "as residlab does"
    )


@vector_app.command("import")
@handle_errors
def import_(
    source: Annotated[Path, typer.Argument(help="A control-vector .gguf (llama.cpp, repeng or residlab).")],
    target: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="The model it is for (needed for files not written by residlab)."),
    ] = None,
    allow_other_model: Annotated[bool, typer.Option(help="Accept a vector saved for a model of another name.")] = False,
    force: ForceOption = False,
) -> None:
    """Read a llama.cpp control vector into a residlab vector, checked against the model."""
    from residlab.core.io import check_output_file
    from residlab.models.loading import model_shape
    from residlab.vectors.gguf_control import import_control_vector

    check_output_file(target, inputs=(source,), overwrite=force)
    shape = model_shape(model) if model else None
    vec = import_control_vector(source, shape, strict=not allow_other_model)
    vec.save(target)
    console.print(f"wrote {target} ({vec.model_name}, layers {vec.layers})")
