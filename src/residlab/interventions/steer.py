"""Steering vectors applied to the residual stream (or a block part) while a model runs."""

from __future__ import annotations

import torch

from residlab.core.errors import ModelMismatchError, ResidlabError
from residlab.interventions.hooks import HookSet
from residlab.interventions.operators import SteeringOperator, steering_operator
from residlab.interventions.positions import STEERING_RULES, PositionRule, validate_rule
from residlab.interventions.sites import block_site
from residlab.interventions.target import HookTarget


class Steering:
    """A context manager that applies ``delta[layer]`` at ``site`` of each steered layer.

    ``deltas`` maps layer -> [d] or [rows, d] tensor (already multiplied by the strength). With
    ``rows`` > 1, row ``i`` of the caller's batch gets row ``i`` of the delta, also when
    the model's ``generate`` reorders prompts into sub-batches. Positions follow ``rule``
    (see :mod:`residlab.interventions.positions`), identically with and without the KV cache.

    ``site`` is a block site of residual width (:mod:`residlab.interventions.sites`; default
    ``block``, the block's output, where ``layer i`` lives). ``operator`` says how the delta changes
    the value there: ``add`` (default), ``project_out``, ``add_norm_preserving``, ``clamp`` or a
    callable (:mod:`residlab.interventions.operators`). Hooks never mutate the model's weights and are
    removed on exit, exceptions included.
    """

    def __init__(
        self,
        lm: HookTarget,
        deltas: dict[int, torch.Tensor],
        rule: PositionRule,
        *,
        site: str = "block",
        operator: str | SteeringOperator = "add",
    ) -> None:
        self._lm = lm
        self.rule = validate_rule(rule, STEERING_RULES)
        self.site = site
        self._site = block_site(site, purpose="steering", residual_only=True)
        self.operator = steering_operator(operator)
        self.deltas = {
            lm.check_layer(layer): (d if d.dim() == 2 else d.unsqueeze(0)).to(lm.device, lm.dtype)
            for layer, d in deltas.items()
        }
        for layer, d in self.deltas.items():
            if not bool(torch.isfinite(d).all()):
                raise ResidlabError(
                    f"the steering delta for layer {layer} holds NaN or infinite values.",
                    hint="use a finite strength and a finite vector.",
                )
            if d.shape[-1] != lm.hidden_size:
                raise ModelMismatchError(
                    f"steering delta for layer {layer} has size {d.shape[-1]}, the model's hidden size is "
                    f"{lm.hidden_size}.",
                    hint="use a vector extracted from this model.",
                )
        self._hooks = HookSet()

    def _transform(self, delta: torch.Tensor):
        tracker = self._lm.tracker
        per_row = delta.shape[0] > 1
        # [rows, 1, d] once per device and dtype, so each pass does one multiply-add and no reshapes.
        # The delta goes where the hooked module computes (a model split over GPUs by a device map
        # runs each block on its own device, possibly in its own dtype).
        placed: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        operator = self.operator

        def transform(hidden: torch.Tensor) -> torch.Tensor:
            mask = tracker.steering_mask(self.rule, hidden.dtype, hidden.device)
            d = placed.get((hidden.device, hidden.dtype))
            if d is None:
                d = placed[(hidden.device, hidden.dtype)] = delta.to(hidden.device, hidden.dtype).unsqueeze(1)
            if per_row:
                rows = tracker.context_on(hidden.device).row_index
                if int(rows.max()) >= d.shape[0]:
                    raise ResidlabError(
                        f"a per-row steering vector has {d.shape[0]} rows but the batch has more rows.",
                        hint="give one vector or strength per prompt, or a single one for all.",
                    )
                d = d.index_select(0, rows)
            return operator(hidden, d, mask)

        return transform

    def __enter__(self) -> Steering:
        self._lm.tracker.acquire()
        try:
            for layer, delta in self.deltas.items():
                module = self._lm.block_part(layer, self._site.part)
                self._hooks.replace(module, self._site.reads, self._transform(delta))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.remove_all()
        self._lm.tracker.release()
