"""Follows each forward pass of a model to tell hooks which real positions they are seeing."""

from __future__ import annotations

from typing import Any

import torch

from residlab.interventions.positions import ForwardContext, PositionRule, steering_mask
from residlab.interventions.schedules import position_scales


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


class ForwardTracker:
    """A forward pre-hook on the decoder stack that builds a :class:`ForwardContext` per pass.

    It reads what every caller passes to the decoder (our own generation loop, ``model.generate``
    or a plain ``model(...)``): the 2-D attention mask if there is one (left padding, cache length),
    else position ids, else the cache length. A pass over an empty cache starts new sequences and
    fixes their prompt lengths; later passes are generated tokens. The tracker is active only while
    some intervention needs it (reference counted), and removes its hook when the last one exits.
    """

    def __init__(self, decoder: torch.nn.Module) -> None:
        self._decoder = decoder
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._users = 0
        self.context: ForwardContext | None = None
        # Set by callers that know better than the cache can tell: which caller rows a batch holds
        # (a list split into sorted sub-batches) and the prompt lengths (generation without a cache
        # re-feeds the whole sequence, which would otherwise look like a new, longer prompt).
        self.row_index: torch.Tensor | None = None
        self.prompt_lengths: torch.Tensor | None = None
        # Set by a decoder running an adaptive strength schedule: [batch, steps so far] scale of each
        # generated position (see interventions.schedules); steering masks are multiplied by it.
        self.generated_scales: torch.Tensor | None = None
        self._masks: dict[Any, torch.Tensor] = {}
        self._moved: dict[torch.device, ForwardContext] = {}

    # -- activation -------------------------------------------------------------------------
    def acquire(self) -> None:
        if self._users == 0:
            self._handle = self._decoder.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            self.context = None
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._handle is not None:
            self._handle.remove()
            self._handle = None
            self.context = None
            self._masks.clear()
            self._moved.clear()

    # -- per pass ---------------------------------------------------------------------------
    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if ids is None:
            ids = kwargs["inputs_embeds"]
        batch, tokens = ids.shape[:2]
        device = ids.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            mask = mask.to(device)
            past = mask.shape[1] - tokens
            real = mask[:, -tokens:].bool()
            positions = (mask.long().cumsum(-1)[:, -tokens:] - 1).masked_fill(~real, -1)
        else:
            past = _cache_length(kwargs.get("cache", kwargs.get("past_key_values")))
            position_ids = kwargs.get("position_ids")
            if position_ids is not None:
                positions = position_ids.to(device).long().expand(batch, tokens)
            else:
                positions = (past + torch.arange(tokens, device=device)).expand(batch, tokens)
        previous = self.context
        if self.prompt_lengths is not None and self.prompt_lengths.shape[0] == batch:
            prompt_lengths = self.prompt_lengths
        elif past == 0 or previous is None or previous.prompt_lengths.shape[0] != batch:
            prompt_lengths = positions.max(dim=1).values + 1 if past == 0 else positions.min(dim=1).values
        else:
            prompt_lengths = previous.prompt_lengths
        row_index = self.row_index
        if row_index is None or row_index.shape[0] != batch:
            row_index = torch.arange(batch, device=device)
        self.context = ForwardContext(positions, prompt_lengths.to(device), row_index.to(device))
        self._masks.clear()
        self._moved.clear()

    def context_on(self, device: torch.device) -> ForwardContext:
        """The current pass's context on ``device`` (moved once per pass and device: a model split
        over several GPUs runs later blocks on other devices than its inputs)."""
        if self.context is None:
            raise RuntimeError("an intervention hook ran outside a tracked forward pass")
        if self.context.positions.device == device:
            return self.context
        moved = self._moved.get(device)
        if moved is None:
            moved = self._moved[device] = self.context.to(device)
        return moved

    def steering_mask(self, rule: PositionRule, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """[batch, tokens, 1] mask for ``rule`` in the current pass on ``device`` (default: the
        inputs' device), times the adaptive scale of each position when a schedule runs; computed once
        per pass."""
        key = (rule, dtype, device)
        cached = self._masks.get(key)
        if cached is None:
            if self.context is None:
                raise RuntimeError("steering hook ran outside a tracked forward pass")
            context = self.context if device is None else self.context_on(device)
            mask = steering_mask(rule, context).float()
            scales = self.generated_scales
            if scales is not None and scales.shape[0] == mask.shape[0]:
                mask = mask * position_scales(context.positions, context.prompt_lengths, scales.to(mask.device))
            cached = mask.unsqueeze(-1).to(dtype)
            self._masks[key] = cached
        return cached
