"""Rows joining and leaving a batched KV cache (transformers' ``DynamicCache``) under left padding.

The running batch keeps one key/value tensor per layer, [rows, heads, tokens, head_dim], every row
left-padded to the same length and described by a 2-D attention mask (0 = padding). Rows that join are
padded on the left to the common length (their mask says so, and explicit position ids keep each
row's real positions), rows that leave are dropped (``batch_select_indices``), and columns that are
padding in every row are cut off, so the cache never grows beyond the longest live row.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


def joinable(cache: Any) -> bool:
    """Whether rows can join ``cache``: every layer a plain full-attention ``DynamicLayer`` (a sliding
    window cache keeps a window per row that left padding would shift)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _pad_left(tensor: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def join(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> torch.Tensor:
    """Append ``other``'s rows to ``cache`` (in place); return the joined mask [rows, tokens]."""
    length = max(mask.shape[1], other_mask.shape[1])
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        for name in ("keys", "values"):
            a, b = getattr(mine, name), getattr(theirs, name)
            a = _pad_left(a, length - a.shape[-2], -2)
            b = _pad_left(b, length - b.shape[-2], -2)
            setattr(mine, name, torch.cat([a, b], dim=0))
    return torch.cat(
        [_pad_left(mask, length - mask.shape[1], 1), _pad_left(other_mask, length - other_mask.shape[1], 1)]
    )


def keep_rows(cache: Any, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only the rows ``keep`` (in place) and cut the columns that are padding in all of them;
    return the new mask."""
    cache.batch_select_indices(keep)
    mask = mask.index_select(0, keep)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    if start and joinable(cache):  # a sliding window cache ties its length to the mask's: left as it is
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
        mask = mask[:, start:]
    return mask
