"""The engine base: generate a batch of prompts, optionally steered, and score token sequences.

Two engines build on it: :class:`~residlab.engines.torch_engine.TorchEngine` (transformers plus
residlab's hooks: every position rule, per-row vectors, any dtype) and
:class:`~residlab.engines.llamacpp.LlamaCppEngine` (llama.cpp's control-vector adapter on the
quantised GGUF: several times faster on a CPU). Both render prompts with the same tokenizer and
chat template (in the shared base) and feed the same token ids, so their outputs are directly comparable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from residlab.core.errors import ResidlabError
from residlab.core.generation import (
    BatchDecoder,
    Generation,
    Prompt,
    SamplingParams,
    generate_batched,
    has_chat_template,
    render_prompt,
)
from residlab.core.types import finite_number
from residlab.interventions.positions import STEERING_RULES, PositionRule, recorded_rule, validate_rule
from residlab.interventions.schedules import StrengthSchedule

if TYPE_CHECKING:
    from residlab.vectors.steering_vector import SteeringVector

ENGINES = ("torch", "llamacpp")


@dataclass(frozen=True)
class SteeringSpec:
    """Steering for one generation call: ``strength * vector`` added at ``layers`` (default: all of
    the vector's layers) at the positions ``positions`` selects (default: the rule the vector
    records, e.g. ``all`` for a llama.cpp / repeng control vector; after construction ``positions``
    and :attr:`rule` hold the rule that runs). ``strength`` multiplies the vector as stored
    (residlab saves unit vectors, so it is then the norm of what is added). ``schedule`` (optional)
    scales it per row and generated token (:mod:`residlab.interventions.schedules`)."""

    vector: SteeringVector
    strength: float = 1.0
    positions: PositionRule | None = None
    layers: tuple[int, ...] | None = None
    allow_other_model: bool = False  # a vector recorded for a model of another name (same shape) is fine
    schedule: StrengthSchedule | None = None  # adaptive strength during generation (None: constant)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", finite_number(self.strength, "strength"))
        rule = recorded_rule([self.vector.position_rule]) if self.positions is None else self.positions
        object.__setattr__(self, "positions", validate_rule(rule, STEERING_RULES))

    @property
    def rule(self) -> PositionRule:
        """The position rule that runs: the one given, or the vector's own."""
        assert self.positions is not None  # resolved on construction
        return self.positions

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


class Engine(ABC):
    """An inference engine: generate completions for a batch of prompts, optionally steered, and score
    token sequences; what the evaluation runner, the CLI, the server and the benchmarks use.

    The engine base does the shared part of ``generate`` (prompts rendered through the chat template,
    tokenised, checked, sorted into batches; seeding; see :func:`~residlab.core.generation.generate_batched`),
    so every engine feeds the model the same token ids. A subclass gives the model's facts, its batch
    decoder under a steering (:meth:`_steered`) and :meth:`score`. Engines are context managers
    (``with open_engine(...) as engine:``) that :meth:`close` on exit.
    """

    kind: ClassVar[str]  # "torch" | "llamacpp"
    first_steerable_layer: ClassVar[int] = 0  # the lowest layer the engine can add a steering delta to
    # Token ids at or beyond this are rejected before decoding (None: the engine does not check).
    vocab_size: int | None = None

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name  # the model's name (as vectors record it)

    # -- facts ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abstractmethod
    def identity(self) -> str:
        """Everything about the engine that changes outputs (kind, weights, dtype): part of record fingerprints."""

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    # -- text -> tokens -----------------------------------------------------------------------
    def format_prompt(self, prompt: Prompt, chat: bool | None = None, system: str | None = None) -> str:
        """A prompt as the model sees it (see :func:`~residlab.core.generation.render_prompt`)."""
        return render_prompt(self.tokenizer, prompt, chat=chat, system=system, model_name=self.name)

    def tokenize(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of an already formatted text."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # -- running ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        steering: SteeringSpec | None = None,
        chat: bool | None = None,
        system: str | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[Generation]:
        """One completion per prompt, in the caller's order (greedy by default; see :class:`SamplingParams`).

        ``chat``/``system`` choose how prompts are rendered (default: through the chat template when
        there is one); ``batch_size`` and ``progress`` how the work is scheduled and shown.
        """
        with self._steered(steering) as decode:
            return generate_batched(
                self.tokenizer,
                prompts,
                sampling,
                decode,
                chat=chat,
                system=system,
                batch_size=batch_size,
                progress=progress,
                model_name=self.name,
                vocab_size=self.vocab_size,
            )

    @abstractmethod
    def _steered(self, steering: SteeringSpec | None) -> AbstractContextManager[BatchDecoder]:
        """Check ``steering`` against the model and put it in effect for the ``with`` block, yielding
        the batch decoder that generates under it (``None``: unsteered)."""

    @abstractmethod
    def score(self, token_ids: Sequence[int], steering: SteeringSpec | None = None) -> np.ndarray:
        """Teacher-forced logits [len(token_ids), vocab] (float32) for one token sequence; steering
        here applies at every position (rule ``all``)."""

    # -- lifetime -----------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Free what the engine holds outside Python's memory (llama.cpp's model and context); the
        engine is unusable afterwards. Called on leaving a ``with`` block."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
