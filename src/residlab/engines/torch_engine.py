"""The torch engine: a :class:`LanguageModel` (transformers) steered by residlab's own hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from residlab.core.generation import Generation, Prompt
from residlab.engines.base import SteeringSpec
from residlab.models.lm import Batch, LanguageModel


class TorchEngine:
    """Runs on the wrapped :class:`LanguageModel`; supports every position rule and per-row vectors
    (through ``lm.steer`` directly)."""

    kind = "torch"

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.name = lm.name

    @property
    def num_layers(self) -> int:
        return self.lm.num_layers

    @property
    def hidden_size(self) -> int:
        return self.lm.hidden_size

    @property
    def identity(self) -> str:
        return f"torch:{str(self.lm.dtype).removeprefix('torch.')}"

    @property
    def has_chat_template(self) -> bool:
        return self.lm.has_chat_template

    def format_prompt(self, prompt: Prompt, chat: bool | None = None, system: str | None = None) -> str:
        return self.lm.format_prompt(prompt, chat=chat, system=system)

    def tokenize(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _steering(self, steering: SteeringSpec | None, positions: str | None = None):
        if steering is None or steering.strength == 0:
            return contextlib.nullcontext()
        return self.lm.steer(
            steering.vector,
            strength=steering.strength,
            positions=positions or steering.positions,
            layers=steering.chosen_layers,
        )

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
        with self._steering(steering):
            return self.lm.generate(
                prompts,
                max_new_tokens=max_new_tokens,
                chat=chat,
                system=system,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                batch_size=batch_size,
                ignore_eos=ignore_eos,
                progress=progress,
            )

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int], steering: SteeringSpec | None = None) -> np.ndarray:
        ids = torch.tensor([list(token_ids)], device=self.lm.device)
        batch = Batch(ids, torch.ones_like(ids))
        with self._steering(steering, positions="all"):
            logits = self.lm.forward(batch)
        return logits[0].float().cpu().numpy()

    def close(self) -> None:
        """Nothing to free explicitly (the model is garbage-collected with the engine)."""
