"""Attention weights of the last query position, captured while a model runs.

Fused attention kernels (sdpa, flash) never form the attention pattern, so the model is switched to
transformers' eager attention for the ``with`` block and switched back on exit (exceptions included):
the user's model is never changed for good. The attention modules of every mapped family return
``(output, weights)``, and with eager attention the weights are the softmax pattern
``[batch, heads, queries, keys]``; only the last query row is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from residlab.core.errors import ResidlabError
from residlab.interventions.hooks import HookSet

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


class LastRowAttention:
    """A context manager: ``self.rows[layer]`` is the last pass's [batch, heads, keys] attention of the
    last position, for every layer."""

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm
        self._hooks = HookSet()
        self._previous: str | None = None
        self.rows: dict[int, torch.Tensor] = {}

    def _catch(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise ResidlabError(
                    f"the attention of layer {layer} ({type(module).__name__}) returned no attention weights.",
                    hint="the factual-recall analysis needs an attention module that returns (output, weights) "
                    "under eager attention, as transformers' decoder models do.",
                )
            self.rows[layer] = weights[:, :, -1, :].detach().float()

        return hook

    def __enter__(self) -> LastRowAttention:
        model = self._lm.model
        self._previous = getattr(model.config, "_attn_implementation", None)
        if self._previous != "eager":
            model.set_attn_implementation("eager")  # type: ignore[operator]
        try:
            for layer in range(self._lm.num_layers):
                self._hooks.forward(self._lm.block_part(layer, "attn"), self._catch(layer))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove_all()
        if self._previous is not None and self._previous != "eager":
            self._lm.model.set_attn_implementation(self._previous)  # type: ignore[operator]
