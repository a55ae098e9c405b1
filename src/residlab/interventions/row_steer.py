"""Per-row steering for a batch whose rows come and go: each row carries its own vector, layers and rule.

A server that batches requests continuously runs rows that belong to different requests in one forward
pass. :class:`RowSteering` keeps a table of deltas per *slot* (a request's place in the server, not
its place in the batch) and, while a forward pass runs, adds to each batch row the delta of the slot it
belongs to (``tracker.row_index``), at the positions of that row's own rule. It is activation addition
only (``h' = h + m δ``, as :func:`~residlab.interventions.operators.add`), computed with the same ops
and dtype as :class:`~residlab.interventions.steer.Steering`, so a row steered here is bit-for-bit the
row steered alone; a slot without steering adds an exact zero. Positions are real positions
(:mod:`residlab.interventions.positions`), so the result is the same with and without the KV cache and
whatever a row's left padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from residlab.core.errors import ModelMismatchError, ResidlabError
from residlab.interventions.hooks import HookSet
from residlab.interventions.positions import STEERING_RULES, ForwardContext, PositionRule, steering_mask, validate_rule
from residlab.interventions.target import HookTarget


class RowSteering:
    """A table of per-slot steering deltas, applied to a batch by the slots its rows belong to.

    ``set_row(slot, deltas, rule)`` gives a slot its deltas (``{layer: tensor[d]}``, strength included)
    and position rule; ``clear_row(slot)`` takes them away. ``with steering.applied(slots):`` attaches
    hooks at the layers any of ``slots`` steers (none at all when no slot steers) for the forward passes
    in the block; the caller sets ``tracker.row_index`` to the slot of each batch row. Hooks are removed
    on exit, exceptions included.
    """

    def __init__(self, lm: HookTarget, capacity: int) -> None:
        if capacity < 1:
            raise ResidlabError(f"capacity must be at least 1, got {capacity}.", hint="pass the most rows a batch has.")
        self._lm = lm
        self.capacity = capacity
        self._tables: dict[int, torch.Tensor] = {}  # layer -> [capacity, d] in the model's dtype
        self._layers: list[frozenset[int]] = [frozenset()] * capacity
        self._rules: list[PositionRule] = ["all"] * capacity
        self._hooks = HookSet()
        # the mask of the current pass; the context is held so that its identity marks the pass
        self._mask_key: tuple[ForwardContext, torch.dtype] | None = None
        self._mask: torch.Tensor | None = None

    # -- the table ------------------------------------------------------------------------------
    def set_row(self, slot: int, deltas: Mapping[int, torch.Tensor], rule: PositionRule) -> None:
        """Steer ``slot`` with ``deltas`` (``{layer: [d]}``) at the positions of ``rule``."""
        lm = self._lm
        checked = {lm.check_layer(layer): delta for layer, delta in deltas.items()}
        rule = validate_rule(rule, STEERING_RULES)
        for layer, delta in checked.items():
            if delta.shape[-1] != lm.hidden_size or delta.numel() != lm.hidden_size:
                raise ModelMismatchError(
                    f"the steering delta for layer {layer} has {delta.numel()} values; the model's hidden size "
                    f"is {lm.hidden_size}.",
                    hint="use a vector extracted from this model.",
                )
            if not bool(torch.isfinite(delta).all()):
                raise ResidlabError(
                    f"the steering delta for layer {layer} holds NaN or infinite values.",
                    hint="use a finite strength and a finite vector.",
                )
        self.clear_row(slot)
        for layer, delta in checked.items():
            table = self._tables.get(layer)
            if table is None:
                table = self._tables[layer] = torch.zeros(
                    self.capacity, lm.hidden_size, device=lm.device, dtype=lm.dtype
                )
            # the cast Steering makes of the same float32 delta: the same bits reach the add
            table[slot] = delta.flatten().to(lm.device, lm.dtype)
        self._layers[slot] = frozenset(checked)
        self._rules[slot] = rule

    def clear_row(self, slot: int) -> None:
        """``slot`` steers nothing from now on."""
        for layer in self._layers[slot]:
            self._tables[layer][slot] = 0
        self._layers[slot] = frozenset()

    def steers(self, slot: int) -> bool:
        return bool(self._layers[slot])

    # -- applying it ----------------------------------------------------------------------------
    def applied(self, slots: Sequence[int]) -> _Applied:
        """A context manager: the hooks for a batch made of ``slots`` (see the class docstring)."""
        layers = sorted(set().union(*(self._layers[s] for s in slots))) if slots else []
        return _Applied(self, layers)

    def _row_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[batch, tokens, 1]: where each row's own rule steers in the current pass (computed once per pass)."""
        context = self._lm.tracker.context
        if context is None:
            raise RuntimeError("row steering ran outside a tracked forward pass")
        if self._mask is not None and self._mask_key is not None and self._mask_key[0] is context:
            if self._mask_key[1] == dtype:
                return self._mask
        slots = context.row_index.tolist()
        mask = torch.zeros(context.positions.shape, dtype=torch.bool, device=context.positions.device)
        for rule in {self._rules[s] for s in slots if self._layers[s]}:
            rows = torch.tensor(
                [i for i, s in enumerate(slots) if self._layers[s] and self._rules[s] == rule],
                device=mask.device,
            )
            # only the rows that use the rule: an index rule is checked against their own prompts
            sub = ForwardContext(
                context.positions.index_select(0, rows),
                context.prompt_lengths.index_select(0, rows),
                context.row_index.index_select(0, rows),
            )
            mask[rows] = steering_mask(rule, sub)
        self._mask_key, self._mask = (context, dtype), mask.unsqueeze(-1).to(dtype)
        return self._mask

    def _transform(self, layer: int):
        table = self._tables[layer]

        def transform(hidden: torch.Tensor) -> torch.Tensor:
            context = self._lm.tracker.context
            assert context is not None  # set by the tracker's pre-hook before any block runs
            delta = table.index_select(0, context.row_index).unsqueeze(1)  # [batch, 1, d]
            return hidden + self._row_mask(hidden.dtype) * delta

        return transform


class _Applied:
    """The hooks of one :meth:`RowSteering.applied` block."""

    def __init__(self, owner: RowSteering, layers: list[int]) -> None:
        self._owner = owner
        self._layers = layers

    def __enter__(self) -> _Applied:
        owner = self._owner
        if not self._layers:
            return self
        owner._lm.tracker.acquire()
        try:
            for layer in self._layers:
                owner._hooks.replace(owner._lm.block_part(layer, ""), "output", owner._transform(layer))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._layers:
            return
        self._owner._hooks.remove_all()
        self._owner._mask_key = self._owner._mask = None
        self._owner._lm.tracker.release()
