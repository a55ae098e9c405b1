"""The torch engine: a :class:`LanguageModel` (transformers) steered by residlab's own hooks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from residlab.core.generation import BatchDecoder
from residlab.engines.base import Engine, SteeringSpec
from residlab.models.lm import Batch, LanguageModel


class TorchEngine(Engine):
    """Runs on the wrapped :class:`LanguageModel`; supports every position rule and per-row vectors
    (through ``lm.steer`` directly)."""

    kind = "torch"

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__(lm.tokenizer, lm.name)
        self.lm = lm

    @property
    def num_layers(self) -> int:
        return self.lm.num_layers

    @property
    def hidden_size(self) -> int:
        return self.lm.hidden_size

    @property
    def identity(self) -> str:
        # a GPU's kernels round differently from the CPU's, so its records are its own; CPU runs keep
        # the identity they always had (their stored records stay valid)
        kind = self.lm.device.type
        return f"torch:{str(self.lm.dtype).removeprefix('torch.')}" + ("" if kind == "cpu" else f"@{kind}")

    def _steering(self, steering: SteeringSpec | None, positions: str | None = None):
        if steering is None or steering.strength == 0:
            return contextlib.nullcontext()
        return self.lm.steer(
            steering.vector,
            strength=steering.strength,
            positions=positions or steering.positions,
            layers=steering.chosen_layers,
            allow_other_model=steering.allow_other_model,
        )

    @contextlib.contextmanager
    def _steered(self, steering: SteeringSpec | None) -> Iterator[BatchDecoder]:
        with self._steering(steering):
            schedule = steering.schedule if steering is not None and steering.strength != 0 else None
            yield functools.partial(self.lm.decode_batch, schedule=schedule) if schedule else self.lm.decode_batch

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int], steering: SteeringSpec | None = None) -> np.ndarray:
        ids = torch.tensor([list(token_ids)], device=self.lm.device)
        batch = Batch(ids, torch.ones_like(ids))
        with self._steering(steering, positions="all"):
            logits = self.lm.forward(batch)
        return logits[0].float().cpu().numpy()

    def close(self) -> None:
        """Nothing to free: the model may be shared (``open_engine(lm=...)``) and is garbage-collected."""

    def __repr__(self) -> str:
        return f"TorchEngine({self.lm!r})"
