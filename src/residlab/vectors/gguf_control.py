"""llama.cpp control-vector GGUF files: export residlab vectors, import llama.cpp's and repeng's.

The format (llama.cpp ``common_control_vector_load_one``, ``cvector-generator``, repeng's
``export_gguf``): ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the
model's architecture), ``controlvector.layer_count``, and one float32 1-D tensor ``direction.<N>``
per layer. llama.cpp adds ``direction.N`` (times the scale given on its command line) to the output
of decoder block N, counted from 0; N = 0 is rejected by llama.cpp. That is residlab's layer
convention exactly (layer i = output of block i), so the layer numbers are written unchanged and a
residlab vector at layer 0 cannot be exported.

llama.cpp applies a file at scale 1 unless told otherwise (``--control-vector-scaled FILE S``), so
:func:`export_control_vector` writes ``scale * direction`` (by default the strength recorded in the
vector's ``info``) and records the scale and residlab's metadata under ``residlab.*`` keys;
:func:`import_control_vector` divides the scale back out, so a round trip returns the same vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from residlab.core.errors import ModelMismatchError, ResidlabError
from residlab.core.io import atomic_path
from residlab.core.types import ModelShape
from residlab.vectors.steering_vector import SteeringVector

ARCH = "controlvector"
UNKNOWN_ARCHITECTURE = "unknown"  # the model hint of a vector that does not record its architecture
_PREFIX = "residlab."


def export_control_vector(
    vector: SteeringVector, path: str | Path, *, scale: float | None = None, model_hint: str = ""
) -> Path:
    """Write ``vector`` as a llama.cpp control-vector GGUF (atomically).

    ``scale`` multiplies every direction; default: ``vector.info["strength"]`` if recorded, else 1,
    so that ``llama-cli --control-vector FILE`` steers as residlab would. ``model_hint`` is the
    architecture (Hugging Face ``config.model_type``: ``qwen2``, ``llama``...), as repeng writes it and
    compares it when vectors are combined; default: the one the vector records, else ``unknown`` (the
    key must be there: repeng refuses a file without it). llama.cpp ignores it.
    """
    from gguf import GGUFWriter

    if 0 in vector.directions:
        raise ResidlabError(
            "llama.cpp cannot apply a control vector at layer 0 (it reads direction.0 as invalid).",
            hint="use layers >= 1: vec.select([layer for layer in vec.layers if layer > 0]).",
        )
    if scale is None:
        scale = float(vector.info.get("strength", 1.0))
    if not math.isfinite(scale) or scale == 0:
        raise ResidlabError(
            f"cannot export with scale {scale}: the file would hold {'zeros' if scale == 0 else 'non-finite values'}"
            " that residlab (and llama.cpp) cannot read back as a direction.",
            hint="pass a finite, non-zero --scale (the vector's recorded strength is used when none is given).",
        )
    path = Path(path)
    meta: dict[str, str] = {**vector.metadata(), "scale": repr(float(scale))}
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint or vector.model_type or UNKNOWN_ARCHITECTURE)
        writer.add_int32(f"{ARCH}.layer_count", len(vector.directions))
        for key, value in meta.items():
            writer.add_string(_PREFIX + key, value)
        for layer, direction in vector.directions.items():
            writer.add_tensor(f"direction.{layer}", (direction * scale).numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


# Float tensor types a control vector may come in: read as float32 (what residlab steers in). llama.cpp
# itself applies only F32 files; repeng writes its numpy directions as they are, often float64.
_FLOAT_TYPES = ("F32", "F64", "F16")


@dataclass(frozen=True)
class ControlVectorFile:
    """What a control-vector GGUF holds, before it is matched to a model."""

    path: Path
    model_hint: str  # the architecture it names (config.model_type: qwen2, llama...); informational
    directions: dict[int, torch.Tensor]  # float32, as stored (residlab's scale not yet divided out)
    tensor_types: tuple[str, ...]  # the stored types, e.g. ("F64",) for a repeng file
    residlab: dict[str, Any]  # residlab's own metadata (``residlab.*`` keys); empty for other tools' files

    @property
    def size(self) -> int:
        return next(iter(self.directions.values())).numel()

    @property
    def converted(self) -> bool:
        """Whether the stored directions were not float32 (read as float32; llama.cpp refuses such files)."""
        return self.tensor_types != ("F32",)

    @property
    def written_by_residlab(self) -> bool:
        return self.residlab.get("format") == "residlab.steering_vector"


def read_control_vector(path: str | Path) -> ControlVectorFile:
    """Read a control-vector GGUF (residlab's, llama.cpp's ``cvector-generator``'s or repeng's) as it is.

    Float16 and float64 directions are converted to float32 on reading (repeng writes numpy's
    float64), so residlab steers with them; ``residlab vector export`` writes them back as the F32 file
    llama.cpp needs. Repeated ``direction.N`` tensors are summed, as llama.cpp does.
    """
    path = Path(path)
    fields, tensors, types = _read(path)
    if fields.get("general.architecture") != ARCH:
        raise ResidlabError(
            f"{path} is a GGUF file but not a control vector (architecture {fields.get('general.architecture')!r}).",
            hint="model weights are loaded with `residlab.load`; control vectors have architecture 'controlvector'.",
        )
    directions: dict[int, torch.Tensor] = {}
    for name, data in tensors.items():
        kind, _, index = name.partition(".")
        if kind != "direction" or not index.isdigit():
            raise ResidlabError(
                f"{path} has a tensor {name!r}; control vectors hold only direction.<layer>.",
                hint="is it a control vector? llama.cpp's cvector-generator and repeng write direction.N tensors.",
            )
        layer = int(index)
        vec = torch.from_numpy(np.array(data, dtype=np.float32).reshape(-1))
        directions[layer] = directions[layer] + vec if layer in directions else vec  # llama.cpp sums repeats
    if not directions:
        raise ResidlabError(f"{path} holds no direction tensors.", hint="export a vector with at least one layer.")
    sizes = {t.numel() for t in directions.values()}
    if len(sizes) != 1:
        raise ResidlabError(
            f"{path} has directions of different sizes {sorted(sizes)}.",
            hint="every direction.N of one file must have the model's hidden size.",
        )
    return ControlVectorFile(
        path=path,
        model_hint=str(fields.get(f"{ARCH}.model_hint") or "").replace(UNKNOWN_ARCHITECTURE, ""),
        directions=dict(sorted(directions.items())),
        tensor_types=tuple(sorted(set(types))),
        residlab={k[len(_PREFIX) :]: v for k, v in fields.items() if k.startswith(_PREFIX)},
    )


def import_control_vector(path: str | Path, model: ModelShape | None = None, *, strict: bool = True) -> SteeringVector:
    """Read a control-vector GGUF (residlab's, llama.cpp's ``cvector-generator``'s or repeng's).

    Files written by residlab carry their model and scale; others need ``model`` (for its name,
    layer count and hidden size) and record the rule ``all`` (llama.cpp and repeng steer every
    position). A file whose directions do not match ``model``'s hidden size, or that names layers the
    model lacks, is a :class:`ModelMismatchError`.
    """
    file = read_control_vector(path)
    path = file.path
    ours = file.residlab
    scale = float(ours.get("scale", "1.0"))
    if scale == 0:
        raise ResidlabError(
            f"{path} records scale 0: its directions carry no information.",
            hint="export it again with a non-zero --scale.",
        )
    directions = {k: v / scale for k, v in file.directions.items()}

    if file.written_by_residlab:
        try:
            vector = SteeringVector.from_metadata(directions, ours)
        except (KeyError, ValueError) as err:
            raise ResidlabError(
                f"{path} has malformed residlab metadata ({err}).", hint="export the vector again with residlab."
            ) from None
        if model is not None:
            vector.check_compatible(model, strict_name=strict)
        return vector
    if model is None:
        raise ResidlabError(
            f"{path} is a control vector from another tool (model hint {file.model_hint or 'none'}); "
            "residlab needs the model it is for.",
            hint="pass the model: import_control_vector(path, model); on the command line, --model NAME.",
        )
    _check_shape(path, file.size, max(directions), model)
    info: dict[str, Any] = {"imported_from": str(path)}
    if file.converted:
        info["converted_from"] = "/".join(file.tensor_types)
    return SteeringVector(
        directions=directions,
        model_name=model.name,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        position_rule="all",  # llama.cpp and repeng apply control vectors at every position
        source=f"control-vector GGUF {path.name} (model hint {file.model_hint or '?'})",
        model_type=file.model_hint,
        info=info,
    )


def _check_shape(path: Path, size: int, top_layer: int, model: ModelShape) -> None:
    if size != model.hidden_size:
        raise ModelMismatchError(
            f"{path} holds directions of size {size}, but {model.name} has hidden size {model.hidden_size}.",
            hint="this control vector was made for another model; use one made for this model.",
        )
    if top_layer >= model.num_layers:
        raise ModelMismatchError(
            f"{path} has a direction for layer {top_layer}, but {model.name} has layers 0..{model.num_layers - 1}.",
            hint="this control vector was made for a deeper model.",
        )


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    from gguf import GGUFReader

    if not path.is_file():
        raise ResidlabError(f"no control-vector file at {path}.", hint="check the path.")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise ResidlabError(
            f"{path} is not a readable GGUF file ({err}).", hint="the file is corrupt or truncated; export it again."
        ) from None
    fields = {name: _field_value(f) for name, f in reader.fields.items()}
    tensors, types = {}, []
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in _FLOAT_TYPES:
            raise ResidlabError(
                f"{path}: tensor {t.name} is {kind}; control vectors hold plain float directions.",
                hint=f"write the directions as float32 (residlab reads {', '.join(_FLOAT_TYPES)}); a quantised "
                "control vector cannot be read back as a direction.",
            )
        tensors[t.name] = np.asarray(t.data)
        types.append(kind)
    return fields, tensors, types


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except (AttributeError, ValueError, IndexError):  # older gguf releases
        return None
