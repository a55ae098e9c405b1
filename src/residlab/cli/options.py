"""The options several commands share, declared once.

Each is an ``Annotated`` type to put on a command's parameter (``model: ModelOption = DEFAULT_MODEL``).
Options that need more than typer's own types carry a parser that raises ``ResidlabError`` on a bad
value; :func:`_parser` makes that the usual ``error:`` + ``hint:`` lines and exit code 2 (typer runs
parsers while it reads the command line, outside the command body that ``handle_errors`` guards).
Typer passes defaults through the parser too, so a parsed default is returned as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from residlab.cli.errors import handle_errors
from residlab.core.errors import ResidlabError
from residlab.engines import ENGINES
from residlab.interventions.positions import STEERING_RULES, PositionRule, parse_rule
from residlab.models.devices import check_device_map, resolve_device
from residlab.models.loading import parse_dtype

Parsed = TypeVar("Parsed")


class Layers(tuple[int, ...]):
    """Layer indices chosen on the command line, in the order given."""


@dataclass(frozen=True)
class Positions:
    """A steering position rule as typed (``text``, what logs show) and parsed (``rule``)."""

    text: str
    rule: PositionRule

    def __str__(self) -> str:
        return self.text


DEFAULT_POSITIONS = Positions("prompt_last+generated", "prompt_last+generated")


def parse_layers(text: str) -> Layers:
    """``8:20:2`` (start:stop:step, or ``8:20``), ``8,12,16`` or ``12``."""
    hint = "use 8:20:2 (start:stop:step), 8,12,16 or 12."
    try:
        if ":" in text:
            bounds = [int(x) for x in text.split(":")]
            if len(bounds) not in (2, 3):
                raise ValueError(text)
            layers = Layers(range(*bounds))  # a zero step raises ValueError too
        else:
            layers = Layers(int(x) for x in text.split(","))
    except ValueError:
        raise ResidlabError(f"cannot read layers {text!r}.", hint=hint) from None
    if not layers:
        raise ResidlabError(f"layers {text!r} select no layer.", hint=hint)
    return layers


def parse_positions(text: str) -> Positions:
    """A steering rule name (``all``, ``prompt``, ...) or comma-separated token indices (``0,-1``)."""
    return Positions(text, parse_rule(text, STEERING_RULES))


def parse_strength(text: str) -> float:
    """A finite number (nan or inf would silently turn every steered activation into nan)."""
    try:
        value = float(text)
    except ValueError:
        raise ResidlabError(f"cannot read strength {text!r}.", hint="pass a number such as 1.0, 4 or -0.5.") from None
    if not math.isfinite(value):
        raise ResidlabError(f"strength {text!r} is not a finite number.", hint="pass a number such as 1.0, 4 or -0.5.")
    return value


def parse_dtype_name(text: str) -> str:
    """A torch dtype name the model loader accepts (checked now, resolved when the model loads)."""
    parse_dtype(text)
    return text


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine now (a missing
    GPU fails before anything loads); resolved again where the model loads (a Ray actor's own GPU)."""
    resolve_device(text)
    return text


def parse_device_map(text: str) -> str:
    """An accelerate device map name (``auto``: the blocks spread over every GPU, then the CPU)."""
    checked = check_device_map(text)
    assert checked is not None
    return checked


def parse_engine(text: str) -> str:
    """``auto`` or an engine name."""
    if text != "auto" and text not in ENGINES:
        raise ResidlabError(f"unknown engine {text!r}.", hint=f"use auto or one of {', '.join(ENGINES)}.")
    return text


def _parser(parse: Callable[[str], Parsed]) -> Callable[[str | Parsed], Parsed]:
    """``parse`` for typer: bad text -> ``error:`` + ``hint:``, exit 2; a parsed default passes through."""
    checked = handle_errors(parse)

    def convert(value: str | Parsed) -> Parsed:
        return checked(value) if isinstance(value, str) else value

    return convert


ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", help="Packaged model name, local model dir, .gguf file or Hugging Face id."),
]
EngineOption = Annotated[
    str,
    typer.Option(
        parser=_parser(parse_engine),
        help="Generation engine: auto (llamacpp when installed and the model is a GGUF, else torch), torch or "
        "llamacpp.",
    ),
]
DtypeOption = Annotated[
    str,
    typer.Option(
        parser=_parser(parse_dtype_name),
        help="Torch engine: auto (bfloat16 on a GPU that has it, float16 on older GPUs and MPS; on a CPU "
        "bfloat16 where it runs natively, else float32), float32, bfloat16 or float16.",
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option(
        parser=_parser(parse_device),
        help="Torch engine: auto (CUDA when present, else MPS, else cpu), cpu, cuda, cuda:N or mps.",
    ),
]
DeviceMapOption = Annotated[
    str | None,
    typer.Option(
        parser=_parser(parse_device_map),
        help="Torch engine: 'auto' spreads a model larger than one GPU over all GPUs (accelerate); "
        "steering and recording follow each block's device.",
    ),
]
NGpuLayersOption = Annotated[
    int,
    typer.Option(
        min=-1,
        help="llama.cpp engine: layers offloaded to the GPU (-1 = all, 0 = none); needs llama-cpp-python "
        "built with CUDA or Metal (scripts/install-llamacpp.sh does so when a CUDA toolkit is present).",
    ),
]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="Spread the problems over Ray actors, one engine each: 'local' (a Ray instance on this machine), "
        "'auto' (the cluster this node joined with `ray start`) or a cluster address (ray://head:10001). "
        "Records, resumption and the report are those of a single-process run.",
    ),
]
RayActorsOption = Annotated[
    int | None,
    typer.Option(min=1, help="With --ray: engines to start (default: one per GPU, or one per CPU without GPUs)."),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(help="Folder with gsm8k/ and math500/ (else $RESIDLAB_DATA_DIR or ../shared/data is searched)."),
]
WorkDirOption = Annotated[
    Path, typer.Option(help="Where vectors, records, reports and plots go (reused by later runs).")
]
_LAYERS = typer.Option(
    parser=_parser(parse_layers), help="A subset of the vector's layers: 8:20:2 (start:stop:step), 8,12,16 or 12."
)
LayersOption = Annotated[Layers, _LAYERS]
OptionalLayersOption = Annotated[Layers | None, _LAYERS]
AlsoLayersOption = Annotated[
    Layers | None,
    typer.Option(
        parser=_parser(parse_layers),
        help="More layers steered with --layer, each along its own direction at the same relative strength "
        "(x its residual norm); --method learned trains them jointly. E.g. 8,12.",
    ),
]
_POSITIONS_HELP = "all, prompt, generated, prompt_last+generated, or token indices like 0,-1."
PositionsOption = Annotated[Positions, typer.Option(parser=_parser(parse_positions), help=_POSITIONS_HELP)]
# Steering with a vector file: without --positions, the rule the file records (llama.cpp / repeng files: all).
VectorPositionsOption = Annotated[
    Positions | None,
    typer.Option(parser=_parser(parse_positions), help=_POSITIONS_HELP + " Default: the rule the vector records."),
]
StrengthOption = Annotated[float, typer.Option(parser=_parser(parse_strength), help="Multiplies the vector as stored.")]
# Decoding of the evaluation commands (compress, eval, sweep): greedy by default; reasoning (R1-style) models
# are run sampled (the ASC paper: 0.7 / 0.9), since greedy decoding sends them into endless repetition.
TemperatureOption = Annotated[
    float,
    typer.Option(min=0.0, help="0 = greedy. Reasoning (R1-style) models loop when greedy: sample them at 0.6-0.7."),
]
TopPOption = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus of sampled tokens (--temperature > 0).")]
SeedOption = Annotated[int, typer.Option(min=0, help="Seed of the sampled decoding (each batch draws from its own).")]


ForceOption = Annotated[bool, typer.Option("--force", help="Replace the output file if it exists.")]
