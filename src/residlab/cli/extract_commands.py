"""``residlab extract``: a steering vector from any file of contrast pairs, on any model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from residlab.cli.errors import handle_errors
from residlab.cli.options import (
    DEFAULT_POSITIONS,
    DeviceOption,
    DtypeOption,
    ForceOption,
    ModelOption,
    OptionalLayersOption,
    PositionsOption,
)
from residlab.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from residlab.vectors.steering_vector import SteeringVector

console = Console(highlight=False, soft_wrap=True)


def _default_out(model: str, pairs: Path, method: str) -> Path:
    name = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    return Path("residlab-out") / name / f"{pairs.stem}-{method}.safetensors"


@handle_errors
def extract(
    pairs: Annotated[
        Path,
        typer.Option(
            help='A JSONL file, one pair per line: {"positive": ..., "negative": ...} (texts or chat messages; '
            'optional "prompt" and "read").'
        ),
    ],
    model: ModelOption = DEFAULT_MODEL,
    layers: OptionalLayersOption = None,
    method: Annotated[
        str, typer.Option(help="How the pairs become a direction: mean_diff, pca or logistic.")
    ] = "mean_diff",
    read: Annotated[
        str,
        typer.Option(help="Where each example is read: last, mean, first:N, a token index (-2) or a span (0:8)."),
    ] = "last",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Render prompts through the chat template (default: if any)."),
    ] = None,
    positions: PositionsOption = DEFAULT_POSITIONS,
    normalize: Annotated[
        bool, typer.Option(help="Save unit directions (the strength is then the norm added).")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="The .safetensors file to write (default: residlab-out/<model>/<pairs>-<method>)."),
    ] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    force: ForceOption = False,
) -> None:
    """Extract a steering vector from contrast pairs (positive minus negative) at every chosen layer."""
    from residlab.core.io import check_output_file
    from residlab.models.loading import load
    from residlab.recipes.contrast_pairs import read_pairs
    from residlab.recipes.extraction import ReadPosition, aggregator, extract

    aggregator(method)  # a bad method or read position fails before the model loads
    ReadPosition.parse(read)
    target = check_output_file(out or _default_out(model, pairs, method), inputs=(pairs,), overwrite=force)
    contrast = read_pairs(pairs)
    lm = load(model, dtype=dtype, device=device)
    vector = extract(
        lm,
        contrast,
        layers=layers,
        method=method,
        read=read,
        batch_size=batch_size,
        chat=chat,
        position_rule=positions.text,
        source=f"residlab extract: {method} of positive - negative, {len(contrast)} pairs from {pairs.name}, "
        f"read {read}",
        progress=True,
    )
    _print_layers(vector)
    separation = {int(k): v for k, v in vector.info["separation"].items()}
    best = max(separation, key=lambda k: (separation[k] == separation[k], separation[k]))  # NaN sorts last
    # strength 1 on the raw vector adds the mean difference; on a unit vector its norm does the same
    strength = vector.norm(best) if normalize else 1.0
    (vector.normalized() if normalize else vector).save(target)
    console.print(f"wrote {target} ({lm.name}, {len(contrast)} pairs, layers {vector.layers}, rule {positions})")
    console.print(
        f"best-separated layer: {best}. Try: residlab generate -m {model} --vector {target} --layers {best} "
        f"--strength {strength:.4g} -p '...'",
        markup=False,
    )


def _print_layers(vector: SteeringVector) -> None:
    table = Table(title="per layer")
    for column in ("layer", "separation (CV Cohen's d)", "vector norm", "residual norm", "norm / residual"):
        table.add_column(column, justify="right")
    separation, residual = vector.info["separation"], vector.info["residual_norm"]
    for layer, norm in vector.norms.items():
        sep, res = separation[str(layer)], residual[str(layer)]
        table.add_row(str(layer), f"{sep:.3f}", f"{norm:.4g}", f"{res:.4g}", f"{norm / res:.1%}" if res else "-")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
