"""The engine interface: generate a batch of prompts, optionally steered, and score token sequences.

Two implementations: :class:`~residlab.engines.torch_engine.TorchEngine` (transformers plus
residlab's hooks: every position rule, per-row vectors, any dtype) and
:class:`~residlab.engines.llamacpp.LlamaCppEngine` (llama.cpp's control-vector adapter on the
quantised GGUF: several times faster on a CPU). Both render prompts with the same tokenizer and
chat template and feed the same token ids, so their outputs are directly comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from residlab.core.errors import ResidlabError
from residlab.core.generation import Generation, Prompt

if TYPE_CHECKING:
    from residlab.vectors.steering_vector import SteeringVector

ENGINES = ("torch", "llamacpp")


@dataclass(frozen=True)
class SteeringSpec:
    """Steering for one generation call: ``strength * vector`` added at ``layers`` (default: all of
    the vector's layers) at the positions ``positions`` selects. ``strength`` multiplies the vector
    as stored (residlab saves unit vectors, so it is then the norm of what is added)."""

    vector: SteeringVector
    strength: float = 1.0
    positions: str = "prompt_last+generated"
    layers: tuple[int, ...] | None = None

    @property
    def chosen_layers(self) -> list[int]:
        return sorted(self.vector.layers) if self.layers is None else sorted(self.layers)

    def deltas(self) -> dict[int, np.ndarray]:
        """What is added per layer (float32), ``strength`` included."""
        missing = [x for x in self.chosen_layers if x not in self.vector.directions]
        if missing:
            raise ResidlabError(
                f"the steering vector has no direction for layer(s) {missing}; it has {self.vector.layers}.",
                hint="steer at the vector's layers or extract it at the layers you want.",
            )
        return {
            layer: (self.vector.directions[layer].numpy() * np.float32(self.strength)).astype(np.float32)
            for layer in self.chosen_layers
        }


class Engine(Protocol):
    """What the evaluation runner, the CLI and the benchmarks need from an inference engine."""

    kind: str  # "torch" | "llamacpp"
    name: str  # the model's name (as vectors record it)

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def identity(self) -> str:
        """Everything about the engine that changes outputs (kind, weights, dtype): part of record fingerprints."""
        ...

    @property
    def has_chat_template(self) -> bool: ...

    def format_prompt(self, prompt: Prompt, chat: bool | None = None, system: str | None = None) -> str: ...

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        steering: SteeringSpec | None = None,
        max_new_tokens: int = 256,
        chat: bool | None = None,
        system: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
        ignore_eos: bool = False,
        progress: bool = False,
    ) -> list[Generation]:
        """One completion per prompt, in the caller's order (greedy when ``temperature`` is 0)."""
        ...

    def score(self, token_ids: Sequence[int], steering: SteeringSpec | None = None) -> np.ndarray:
        """Teacher-forced logits [len(token_ids), vocab] (float32) for one token sequence; steering
        here applies at every position (rule ``all``)."""
        ...

    def tokenize(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """Greedy (``temperature`` <= 0) or temperature / nucleus sampling from one row of logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = (logits.astype(np.float64) - logits.max()) / temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < top_p
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_probs[keep]
        probs /= probs.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(probs.shape[0], p=probs))
