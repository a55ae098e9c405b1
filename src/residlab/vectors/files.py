"""Open a steering vector from any supported file: residlab safetensors or a llama.cpp control-vector GGUF."""

from __future__ import annotations

from pathlib import Path

from residlab.core.errors import ResidlabError
from residlab.core.types import ModelShape
from residlab.vectors.gguf_control import import_control_vector
from residlab.vectors.steering_vector import SteeringVector


def load_vector(path: str | Path, model: ModelShape | None = None, *, strict: bool = True) -> SteeringVector:
    """Read ``path`` by its suffix (``.safetensors`` or ``.gguf``); with ``model``, check it fits."""
    path = Path(path)
    if not path.is_file():
        raise ResidlabError(f"no steering vector file at {path}.", hint="check the path.")
    if path.suffix == ".gguf":
        return import_control_vector(path, model, strict=strict)
    if path.suffix == ".safetensors":
        return SteeringVector.load(path, model=model, strict=strict)
    raise ResidlabError(
        f"{path} is neither a .safetensors steering vector nor a .gguf control vector.",
        hint="residlab reads its own .safetensors vectors and llama.cpp / repeng control-vector .gguf files.",
    )
