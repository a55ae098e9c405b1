"""``residlab vector``: inspect steering vectors and convert them to and from llama.cpp control vectors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from residlab.cli.errors import handle_errors
from residlab.cli.options import ForceOption, OptionalLayersOption

if TYPE_CHECKING:
    from residlab.vectors.gguf_control import ControlVectorFile

vector_app = typer.Typer(help="Inspect steering vectors; convert to and from llama.cpp control-vector GGUF files.")
console = Console(highlight=False, soft_wrap=True)


@vector_app.command("show")
@handle_errors
def show(
    path: Annotated[Path, typer.Argument(help="A .safetensors or control-vector .gguf file.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Check the vector against this model (and read another tool's control vector for it)."
        ),
    ] = None,
) -> None:
    """Print a vector's model, layers, norms, position rule and provenance."""
    from residlab.models.loading import model_shape
    from residlab.vectors.files import load_vector
    from residlab.vectors.gguf_control import read_control_vector

    if model is None and path.suffix == ".gguf":
        file = read_control_vector(path)
        if not file.written_by_residlab:
            _show_foreign(file)
            return
    shape = model_shape(model) if model else None
    vec = load_vector(path, shape, strict=False)
    console.print(f"model: {vec.model_name} (hidden size {vec.hidden_size}, {vec.num_layers} layers)")
    if shape is not None:
        console.print(f"fits {shape.name}: yes (same hidden size and depth)")
    if vec.model_type:
        console.print(f"architecture: {vec.model_type}")
    console.print("norms: " + ", ".join(f"layer {k}: {v:.4g}" for k, v in vec.norms.items()))
    console.print(f"position rule: {vec.position_rule}\nsource: {vec.source}\ncreated: {vec.created}")
    if vec.info:
        console.print(f"info: {dict(vec.info)}")


def _show_foreign(file: ControlVectorFile) -> None:
    """What another tool's control vector holds, without a model to check it against."""
    console.print(f"control vector from another tool (llama.cpp / repeng); architecture: {file.model_hint or '?'}")
    console.print(f"direction size: {file.size}; layers: {sorted(file.directions)}")
    console.print("norms: " + ", ".join(f"layer {k}: {float(v.norm()):.4g}" for k, v in file.directions.items()))
    console.print("position rule: all (llama.cpp and repeng steer every position)")
    if file.converted:
        console.print(
            f"stored as {'/'.join(file.tensor_types)}: residlab reads it as float32; llama.cpp needs F32, "
            "which `residlab vector import` then `vector export` writes"
        )
    console.print("pass --model NAME to check it against a model")


@vector_app.command("export")
@handle_errors
def export(
    source: Annotated[Path, typer.Argument(help="A residlab .safetensors vector.")],
    target: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    scale: Annotated[
        float | None, typer.Option(help="Multiply the directions (default: the strength recorded in the vector, or 1).")
    ] = None,
    layers: OptionalLayersOption = None,
    model_hint: Annotated[
        str,
        typer.Option(help="The architecture to record (config.model_type, e.g. qwen2); default: the vector's own."),
    ] = "",
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
        f"wrote {out} (layers {vec.layers}, scale {used:.4g}, architecture {model_hint or vec.model_type or '?'}); "
        "llama.cpp adds direction.N to the output of block N, as residlab does"
    )
    if not (model_hint or vec.model_type):
        console.print(
            "note: the vector does not record its architecture, so the file's model hint is 'unknown'; pass "
            "--model-hint (the model's config.model_type, e.g. qwen2) for repeng's model-type check"
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
