"""RelP's AH-rule: attention with its softmax pattern detached, through transformers' AttentionInterface.

:func:`detached_pattern_attention` is registered once as the attention function (and, with the eager
additive mask, the mask function) named ``residlab_relp``; :func:`detached_attention` switches a model's
``config._attn_implementation`` to it while a ``with`` block runs and restores it after. Attention then
computes ``softmax(q k^T * scaling + mask).detach() @ v``: the same value, but no gradient flows into
the queries and keys, only through the values (the pattern is treated as a constant, as the AH-rule of
LRP for attention asks; under a rule switch, :mod:`.relp_switch`, only in the backward passes whose
rules have ``attention`` on). The model files are not touched. An attention module that does not dispatch
through the interface is found by counting the calls: the context raises instead of silently running
without the rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from residlab.analyses.patching.relp_switch import RuleSwitch, route
from residlab.core.errors import ResidlabError

RELP_ATTENTION = "residlab_relp"
_calls = [0]  # attention calls through the detached-pattern function (read by detached_attention)
_switch: list[RuleSwitch | None] = [None]  # set by detached_attention: the pattern's gradient per backward pass


def detached_pattern_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention ([batch, heads, q, d] inputs; grouped key/value heads repeated) with the softmax
    pattern detached; returns ([batch, q, heads, d] output, the pattern), as every interface function."""
    _calls[0] += 1
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    pattern = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    pattern = route(pattern, pattern.detach(), "attention", _switch[0])
    out = torch.matmul(pattern, value)
    return out.transpose(1, 2).contiguous(), pattern


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RELP_ATTENTION, detached_pattern_attention)
    AttentionMaskInterface.register(RELP_ATTENTION, eager_mask)


@contextmanager
def detached_attention(model: torch.nn.Module, expected_calls: int, switch: RuleSwitch | None = None) -> Iterator[None]:
    """While the block runs, ``model``'s attention uses :func:`detached_pattern_attention`; on a clean
    exit, a clear error if fewer than ``expected_calls`` attention calls went through it. With a
    ``switch``, the pattern is detached only in backward passes whose rules have ``attention`` on."""
    _register()
    config: Any = model.config
    previous, previous_switch = config._attn_implementation, _switch[0]
    _calls[0], _switch[0] = 0, switch
    config._attn_implementation = RELP_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _switch[0] = previous_switch
    if _calls[0] < expected_calls:
        raise ResidlabError(
            f"RelP's AH-rule reached {_calls[0]} of {expected_calls} attention calls of this "
            f"{type(model).__name__}: its attention does not dispatch through transformers' AttentionInterface.",
            hint="turn the attention rule off (RelpRules(attention=False) / --no-attention-rule) for this model.",
        )
