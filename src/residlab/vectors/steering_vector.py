"""``SteeringVector``: per-layer directions plus everything needed to use them correctly later.

Layer convention: layer ``i`` is the output of decoder block ``i`` (0-based), which is Hugging Face
``hidden_states[i + 1]`` for every block but the last (HF's last entry is after the final norm). A vector
is applied by adding ``strength * direction`` to that output.
Saved as safetensors, tensors named ``layer.<i>``, with the metadata in the file's header.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from residlab.core.errors import ModelMismatchError, ResidlabError
from residlab.core.io import atomic_path
from residlab.core.types import ModelShape, check_layer_index

FORMAT = "residlab.steering_vector"
FORMAT_VERSION = "1"
LAYER_CONVENTION = "block_output"  # layer i = output of decoder block i (HF hidden_states[i + 1] but the last)


@dataclass(frozen=True)
class SteeringVector:
    """Directions per layer (``{layer: tensor[d_model]}``, float32 on CPU) and their provenance."""

    directions: Mapping[int, torch.Tensor]
    model_name: str
    hidden_size: int
    num_layers: int
    position_rule: str = "prompt_last+generated"
    source: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    info: Mapping[str, Any] = field(default_factory=dict)
    model_type: str = ""  # the architecture (Hugging Face config.model_type, e.g. qwen2); "" if unknown

    def __post_init__(self) -> None:
        if not self.directions:
            raise ResidlabError(
                "a steering vector needs at least one layer.", hint="give a direction for at least one layer."
            )
        clean: dict[int, torch.Tensor] = {}
        for layer, tensor in self.directions.items():
            t = torch.as_tensor(tensor).detach().to("cpu", torch.float32).flatten()
            if t.numel() != self.hidden_size:
                raise ResidlabError(
                    f"direction for layer {layer} has {t.numel()} values, expected hidden size {self.hidden_size}.",
                    hint="a direction has one value per hidden dimension.",
                )
            if not bool(torch.isfinite(t).all()):
                raise ResidlabError(
                    f"direction for layer {layer} contains NaN or infinite values.", hint="use a finite direction."
                )
            if not 0 <= int(layer) < self.num_layers:
                raise ResidlabError(
                    f"layer {layer} is outside 0..{self.num_layers - 1}.",
                    hint="layer i is the output of decoder block i (0-based).",
                )
            clean[int(layer)] = t
        object.__setattr__(self, "directions", dict(sorted(clean.items())))
        object.__setattr__(self, "info", dict(self.info))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, *, model: ModelShape, layer: int, **kwargs: Any) -> SteeringVector:
        """A one-layer vector for ``model`` at ``layer``."""
        return cls.from_layers({layer: tensor}, model=model, **kwargs)

    @classmethod
    def from_layers(cls, directions: Mapping[int, torch.Tensor], *, model: ModelShape, **kwargs: Any) -> SteeringVector:
        """A vector with one direction per layer, for ``model`` (whose ``model_type``, when it has one,
        is recorded: exported control vectors name it as their architecture)."""
        kwargs.setdefault("model_type", str(getattr(model, "model_type", "") or ""))
        return cls(
            directions={check_layer_index(k, model.num_layers, model.name): v for k, v in directions.items()},
            model_name=model.name,
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            **kwargs,
        )

    # -- facts --------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def norm(self, layer: int | None = None) -> float:
        """L2 norm at ``layer`` (default: the only layer, or the first)."""
        return float(self.directions[self._one_layer(layer)].norm())

    @property
    def norms(self) -> dict[int, float]:
        return {layer: float(t.norm()) for layer, t in self.directions.items()}

    def _one_layer(self, layer: int | None) -> int:
        if layer is None:
            return self.layers[0]
        if layer not in self.directions:
            raise ResidlabError(
                f"no direction for layer {layer}; layers: {self.layers}.", hint=f"use one of the layers {self.layers}."
            )
        return layer

    def check_compatible(self, model: ModelShape, *, strict_name: bool = True) -> None:
        """Raise :class:`ModelMismatchError` if this vector was made for another model."""
        if self.hidden_size != model.hidden_size or self.num_layers != model.num_layers:
            raise ModelMismatchError(
                f"this steering vector was made for {self.model_name} (hidden size {self.hidden_size}, "
                f"{self.num_layers} layers), but {model.name} has hidden size {model.hidden_size} and "
                f"{model.num_layers} layers.",
                hint="extract a vector from this model, or load the model the vector was made for.",
            )
        if strict_name and not names_match(self.model_name, model):
            raise ModelMismatchError(
                f"this steering vector was made for {self.model_name}, not {model.name}.",
                hint="load it with strict=False (CLI: --allow-other-model) if the models are really the same.",
            )

    # -- arithmetic ---------------------------------------------------------------------------
    def _require_same_shape(self, other: SteeringVector) -> None:
        if other.hidden_size != self.hidden_size or other.num_layers != self.num_layers:
            raise ModelMismatchError(
                "cannot combine vectors made for models of different shapes.",
                hint="combine vectors extracted from the same model.",
            )

    def _combine(self, other: SteeringVector, op) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._require_same_shape(other)
        if set(other.layers) != set(self.layers):
            raise ResidlabError(
                f"layers differ: {self.layers} vs {other.layers}.", hint="use .select(layers) on both first."
            )
        return replace(
            self,
            directions={k: op(v, other.directions[k]) for k, v in self.directions.items()},
            source=f"combination of ({self.source}) and ({other.source})",
        )

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, torch.add)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, torch.sub)

    def __mul__(self, factor: float) -> SteeringVector:
        return replace(self, directions={k: v * float(factor) for k, v in self.directions.items()})

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def project_out(self, other: SteeringVector) -> SteeringVector:
        """This vector minus its component along ``other``, layer by layer (``other`` must cover every
        layer of this one; a zero direction in ``other`` removes nothing). The norm is not restored."""
        self._require_same_shape(other)
        missing = [k for k in self.layers if k not in other.directions]
        if missing:
            raise ResidlabError(
                f"the vector to project out has no direction at layer(s) {missing}.",
                hint="extract the other vector at every layer of this one (or .select() this one first).",
            )
        directions = {}
        for layer, v in self.directions.items():
            u = other.directions[layer]
            squared = float(u @ u)
            directions[layer] = v - (float(v @ u) / squared) * u if squared else v.clone()
        return replace(self, directions=directions, source=f"{self.source}, minus its component along ({other.source})")

    def normalized(self) -> SteeringVector:
        """Unit-norm direction at every layer."""
        for layer, norm in self.norms.items():
            if norm == 0:
                raise ResidlabError(
                    f"the direction at layer {layer} is zero and cannot be normalised.",
                    hint="drop that layer (.select) or extract a non-zero direction.",
                )
        return replace(
            self,
            directions={k: v / v.norm() for k, v in self.directions.items()},
            info={**self.info, "normalized": True},
        )

    def select(self, layers: list[int]) -> SteeringVector:
        """The same vector restricted to ``layers``."""
        return replace(self, directions={k: self.directions[self._one_layer(k)] for k in layers})

    def cosine(self, other: SteeringVector, layer: int | None = None) -> float:
        """Cosine similarity at ``layer`` (default: the first shared layer)."""
        if layer is None:
            shared = [k for k in self.layers if k in other.directions]
            if not shared:
                raise ResidlabError("the vectors share no layer.", hint="compare vectors extracted at the same layer.")
            layer = shared[0]
        a, b = self.directions[self._one_layer(layer)], other.directions[other._one_layer(layer)]
        denominator = float(a.norm() * b.norm())
        return float(a @ b) / denominator if denominator else math.nan

    # -- files --------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "layer_convention": LAYER_CONVENTION,
            "position_rule": self.position_rule,
            "source": self.source,
            "created": self.created,
            "norms": json.dumps({str(k): round(v, 6) for k, v in self.norms.items()}),
            "info": json.dumps(self.info, default=str),
            "model_type": self.model_type,
        }

    @classmethod
    def from_metadata(cls, directions: Mapping[int, torch.Tensor], meta: Mapping[str, str]) -> SteeringVector:
        """Rebuild a vector from its directions and the string metadata :meth:`metadata` wrote
        (in a safetensors header or, under ``residlab.*`` keys, a control-vector GGUF)."""
        return cls(
            directions=directions,
            model_name=meta["model_name"],
            hidden_size=int(meta["hidden_size"]),
            num_layers=int(meta["num_layers"]),
            position_rule=meta.get("position_rule", "prompt_last+generated"),
            source=meta.get("source", ""),
            created=meta.get("created", ""),
            info=json.loads(meta.get("info", "{}")),
            model_type=meta.get("model_type", ""),
        )

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (atomically) with the metadata in its header."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(
                {f"layer.{k}": v.contiguous() for k, v in self.directions.items()}, str(tmp), metadata=self.metadata()
            )
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: ModelShape | None = None, strict: bool = True) -> SteeringVector:
        """Read a vector saved by :meth:`save`; with ``model``, check that it was made for it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ResidlabError(f"no steering vector file at {path}.", hint="check the path.")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ResidlabError(
                f"{path} is not a readable safetensors file ({err}).",
                hint="the file is corrupt or truncated; re-create it with `vec.save(path)`.",
            ) from None
        if meta.get("format") != FORMAT:
            raise ResidlabError(
                f"{path} is a safetensors file but not a residlab steering vector (format={meta.get('format')!r}).",
                hint="GGUF control vectors and other formats need their own importer.",
            )
        if meta.get("layer_convention") != LAYER_CONVENTION:
            raise ResidlabError(
                f"{path} uses layer convention {meta.get('layer_convention')!r}.",
                hint="residlab reads vectors whose layer i is the output of block i (block_output).",
            )
        try:
            directions = {int(name.split(".", 1)[1]): t for name, t in tensors.items()}
            vector = cls.from_metadata(directions, meta)
        except (KeyError, ValueError, IndexError) as err:
            raise ResidlabError(
                f"{path} has malformed steering-vector metadata ({err}).", hint="re-create it with `vec.save(path)`."
            ) from None
        if model is not None:
            vector.check_compatible(model, strict_name=strict)
        return vector

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: {v:.3g}" for k, v in self.norms.items())
        return f"SteeringVector(model={self.model_name!r}, layers={{{norms}}}, rule={self.position_rule!r})"


def names_match(recorded: str, model: ModelShape) -> bool:
    """Whether a vector recorded for ``recorded`` belongs to ``model``: case-insensitive, against every
    name the model answers to (``known_names``, e.g. a packaged name and its Hugging Face id)."""
    names = getattr(model, "known_names", None) or (model.name,)
    return recorded.lower() in {n.lower() for n in names}
