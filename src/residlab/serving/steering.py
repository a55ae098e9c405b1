"""Per-request steering: the ``steering`` object of a request body, the vectors it may name, and what runs.

A client names vectors from the directory the server was started with (``--vectors DIR``: every
``*.safetensors`` / ``*.gguf`` file there, by its stem), never by path. The object (sent by OpenAI
clients as ``extra_body={"steering": {...}}``)::

    {"vector": "concise", "strength": 4.0, "layers": [12], "positions": "prompt_last+generated"}
    {"vectors": [{"name": "concise", "strength": 4.0}, {"name": "formal", "strength": -2.0}]}

``layers`` defaults to each vector's own layers, ``positions`` to the rule the vectors record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from residlab.core.errors import ResidlabError
from residlab.core.types import ModelShape
from residlab.engines import SteeringSpec
from residlab.interventions.positions import STEERING_RULES, PositionRule, recorded_rule, validate_rule
from residlab.vectors.files import load_vector
from residlab.vectors.steering_vector import SteeringVector

VECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VECTOR_SUFFIXES = (".safetensors", ".gguf")
MAX_TERMS = 8


class VectorTerm(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=128)
    strength: float = 1.0


class SteeringRequest(BaseModel):
    """The ``steering`` object of a request: one ``vector`` (with ``strength``) or a list of ``vectors``."""

    # forbid: a misspelt key ("strenght") must not silently steer at the default
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    vector: str | None = Field(default=None, min_length=1, max_length=128)
    strength: float = 1.0
    vectors: list[VectorTerm] | None = Field(default=None, min_length=1, max_length=MAX_TERMS)
    layers: list[int] | None = Field(default=None, min_length=1, max_length=256)
    positions: str | list[int] | None = None

    @model_validator(mode="after")
    def _one_way_to_name_vectors(self) -> SteeringRequest:
        if (self.vector is None) == (self.vectors is None):
            raise ValueError("give either 'vector' (with 'strength') or 'vectors' (a list of {name, strength})")
        if self.vectors is not None and "strength" in self.model_fields_set:
            raise ValueError("with 'vectors', give each vector its own strength")
        return self

    def terms(self) -> list[tuple[str, float]]:
        if self.vector is not None:
            return [(self.vector, self.strength)]
        return [(term.name, term.strength) for term in self.vectors or []]


@dataclass(frozen=True)
class ResolvedSteering:
    """What one request steers with: ``(name, vector, strength)`` terms at ``layers`` and ``rule``."""

    terms: tuple[tuple[str, SteeringVector, float], ...]
    layers: tuple[int, ...]
    rule: PositionRule

    @property
    def key(self) -> tuple:
        """Equal for requests that steer identically (the llama.cpp scheduler groups by it)."""
        return tuple((name, strength) for name, _, strength in self.terms), self.layers, self.rule

    def deltas(self) -> dict[int, torch.Tensor]:
        """What is added per layer (float32 [d]): each term's vector times its strength, computed as
        ``lm.steer`` computes it (so a single vector matches ``lm.steer`` bit for bit), summed in order."""
        out: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            total: torch.Tensor | None = None
            for _, vector, strength in self.terms:
                if layer not in vector.directions:
                    continue
                term = torch.stack([vector.directions[layer].float()]) * torch.as_tensor(strength, dtype=torch.float32)
                total = term if total is None else total + term
            if total is not None:
                out[layer] = total[0]
        return out

    def spec(self) -> SteeringSpec:
        """The same steering as an engine's :class:`SteeringSpec` (several terms summed into one vector)."""
        if len(self.terms) == 1:
            _, vector, strength = self.terms[0]
            return SteeringSpec(vector, strength, self.rule, self.layers, allow_other_model=True)
        first = self.terms[0][1]
        combined = SteeringVector(
            directions=self.deltas(),
            model_name=first.model_name,
            hidden_size=first.hidden_size,
            num_layers=first.num_layers,
            position_rule=self.rule if isinstance(self.rule, str) else "all",
            source=" + ".join(f"{s:g}*{n}" for n, _, s in self.terms),
        )
        return SteeringSpec(combined, 1.0, self.rule, self.layers, allow_other_model=True)


class VectorLibrary:
    """The steering vectors a server offers, by name: every vector file in one directory, loaded and
    checked against the model at start, so a request never touches the file system."""

    def __init__(self, vectors: dict[str, SteeringVector], directory: Path | None = None) -> None:
        self.vectors = dict(sorted(vectors.items()))
        self.directory = directory

    @classmethod
    def from_directory(cls, directory: str | Path, model: ModelShape) -> VectorLibrary:
        """Every ``*.safetensors`` / ``*.gguf`` in ``directory`` (not its subfolders), named by stem."""
        root = Path(directory)
        if not root.is_dir():
            raise ResidlabError(f"no vector directory at {root}.", hint="pass --vectors a folder of vector files.")
        vectors: dict[str, SteeringVector] = {}
        for path in sorted(root.iterdir()):
            if path.suffix not in VECTOR_SUFFIXES or not path.is_file():
                continue
            if not VECTOR_NAME.fullmatch(path.stem):
                raise ResidlabError(
                    f"{path.name}: a served vector's name must be letters, digits, '.', '_' or '-'.",
                    hint="rename the file; clients name vectors by the file's stem.",
                )
            if path.stem in vectors:
                raise ResidlabError(f"two files in {root} are named {path.stem!r}.", hint="keep one of them.")
            vectors[path.stem] = load_vector(path, model)
        if not vectors:
            raise ResidlabError(
                f"{root} holds no .safetensors or .gguf vector files.", hint="save vectors there first."
            )
        return cls(vectors, root)

    def names(self) -> list[str]:
        return list(self.vectors)

    def get(self, name: str) -> SteeringVector:
        """A vector by its name; a path or an unknown name is a :class:`ResidlabError` (400)."""
        if not VECTOR_NAME.fullmatch(name) or ".." in name:
            raise ResidlabError(
                f"{name!r} is not a vector name: clients name vectors, never paths.",
                hint=f"use one of the server's vectors: {', '.join(self.names()) or 'none'}.",
            )
        vector = self.vectors.get(name)
        if vector is None:
            raise ResidlabError(
                f"this server has no vector named {name!r}.",
                hint=f"use one of: {', '.join(self.names()) or 'none (start the server with --vectors DIR)'}.",
            )
        return vector

    def resolve(self, request: SteeringRequest, model: ModelShape) -> ResolvedSteering | None:
        """The steering a request asks for (``None`` if every strength is 0), checked against ``model``."""
        terms = [(name, self.get(name), float(strength)) for name, strength in request.terms()]
        if all(strength == 0 for _, _, strength in terms):
            return None
        if request.layers is not None:
            layers = tuple(sorted({_check_layer(layer, model) for layer in request.layers}))
            for name, vector, _ in terms:
                missing = [x for x in layers if x not in vector.directions]
                if missing:
                    raise ResidlabError(
                        f"vector {name!r} has no direction for layer(s) {missing}.",
                        hint=f"it has layers {vector.layers}.",
                    )
        else:
            layers = tuple(sorted({layer for _, vector, _ in terms for layer in vector.layers}))
        if request.positions is None:
            rule = recorded_rule(vector.position_rule for _, vector, _ in terms)
        else:
            rule = validate_rule(request.positions, STEERING_RULES)
        return ResolvedSteering(tuple(terms), layers, rule)


def _check_layer(layer: int, model: ModelShape) -> int:
    if not -model.num_layers <= layer < model.num_layers:
        raise ResidlabError(
            f"layer {layer} is outside this model's {model.num_layers} layers.",
            hint=f"use 0..{model.num_layers - 1} (or negative from the end).",
        )
    return layer % model.num_layers
