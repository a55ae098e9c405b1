"""Mean and zero ablations for the recall analysis: heads (their slice of attention's output
projection input) and the branches of a layer (attention's or the MLP's contribution as added).

Means are taken over the data set *at each position counted from the last token*: prompts are
left-padded, so the last token (where the answer is read) and the tokens just before it line up
across prompts of different lengths; a position only some prompts reach is averaged over those.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Literal

import torch

from residlab.analyses.recall.dla import branch_site, num_heads
from residlab.core.errors import ResidlabError
from residlab.interventions.positions import ForwardContext
from residlab.interventions.record import Recording

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

Head = tuple[int, int]  # (layer, head)
AblationMode = Literal["zero", "mean"]
ABLATION_MODES: tuple[AblationMode, ...] = ("zero", "mean")


class PositionMeans:
    """Running means of recorded [batch, tokens, width] values per key, by distance from the last token."""

    def __init__(self) -> None:
        self._sums: dict[tuple[int, str], torch.Tensor] = {}
        self._counts: dict[tuple[int, str], torch.Tensor] = {}

    def add(self, key: tuple[int, str], values: torch.Tensor, real: torch.Tensor) -> None:
        """Add a left-padded pass: ``values`` [batch, tokens, width], ``real`` [batch, tokens] bool."""
        flipped = (values.float() * real.unsqueeze(-1)).flip(1).sum(dim=0)  # index 0 = the last token
        count = real.flip(1).sum(dim=0).float()
        total, seen = self._sums.get(key), self._counts.get(key)
        if total is not None and seen is not None:
            size = max(total.shape[0], flipped.shape[0])
            flipped = _pad_rows(flipped, size) + _pad_rows(total, size)
            count = _pad_rows(count, size) + _pad_rows(seen, size)
        self._sums[key], self._counts[key] = flipped, count

    def add_recording(self, rec: Recording, real: torch.Tensor) -> None:
        """Add every (layer, site) a ``positions="all"`` recording holds for its last pass."""
        for layer in rec.layers:
            for site in rec.sites:
                self.add((int(layer), site), rec.calls(layer, site)[-1], real)

    def mean(self, key: tuple[int, str]) -> torch.Tensor:
        """[distance from the last token, width] means."""
        if key not in self._sums:
            raise ResidlabError(f"no mean was recorded for {key}.", hint="record the site before ablating it.")
        return self._sums[key] / self._counts[key].clamp(min=1).unsqueeze(-1)

    def at(self, key: tuple[int, str], tokens: int) -> torch.Tensor:
        """The means laid out for a left-padded pass of ``tokens`` columns: [tokens, width]."""
        means = self.mean(key)
        distance = (tokens - 1 - torch.arange(tokens)).clamp(max=means.shape[0] - 1)
        return means[distance]


def _pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))]) if x.shape[0] < size else x


def means_recording(lm: LanguageModel) -> Recording:
    """What the ablations need means of: every layer's heads, and the last layer's branches as added."""
    return lm.record(range(lm.num_layers), "all", ("attn_heads", branch_site(lm, "attn"), branch_site(lm, "mlp")))


def knock_out_heads(lm: LanguageModel, heads: Sequence[Head], means: PositionMeans, stack: ExitStack) -> None:
    """Enter (on ``stack``) edits that replace each head's output with its mean at every position."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    n_heads = num_heads(lm)

    def editor(layer: int, chosen: list[int]):
        def fn(value: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
            width = value.shape[-1] // n_heads
            columns = torch.cat([torch.arange(h * width, (h + 1) * width) for h in chosen]).to(value.device)
            mean = means.at((layer, "attn_heads"), value.shape[1]).to(value.device, value.dtype)
            out = value.clone()
            out[..., columns] = mean[:, columns].expand(value.shape[0], -1, -1)
            return out

        return fn

    if by_layer:
        stack.enter_context(lm.edit(list(by_layer), "attn_heads", {k: editor(k, v) for k, v in by_layer.items()}))


def ablate_branch(
    lm: LanguageModel, layer: int, branch: str, mode: AblationMode, means: PositionMeans, stack: ExitStack
) -> None:
    """Enter (on ``stack``) an edit that zeroes or mean-ablates ``branch`` (attn / mlp) of ``layer``
    as it is added to the residual stream (after a post-norm, where the family has one)."""
    site = branch_site(lm, branch)

    def fn(value: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if mode == "zero":
            return torch.zeros_like(value)
        return means.at((layer, site), value.shape[1]).to(value.device, value.dtype).expand_as(value)

    stack.enter_context(lm.edit(layer, site, fn))
