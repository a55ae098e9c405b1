"""Running a model on a prompt batch and reading every site's activation (and, for the estimates, its
gradient). Hooks come from the intervention system and are removed when each run ends."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from residlab.analyses.patching.sites import UnitShape
from residlab.interventions.hooks import HookSet
from residlab.interventions.sites import SITES

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

SiteKey = tuple[int, str]  # (layer, intervention site name)


def last_logits(lm: LanguageModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's logits at the last column (the last real token: batches are left-padded), [rows, vocab]."""
    kwargs: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False
    )
    if "logits_to_keep" in inspect.signature(type(lm.model).forward).parameters:
        kwargs["logits_to_keep"] = 1  # the unembedding of the other positions is never needed
    return lm.model(**kwargs).logits[:, -1, :]


@dataclass(frozen=True)
class SiteValues:
    """Each (layer, site)'s activation [pairs, tokens, width] in one run, and the run's last logits."""

    values: dict[SiteKey, torch.Tensor]
    logits: torch.Tensor  # [pairs, vocab]


def record_values(
    lm: LanguageModel, ids: torch.Tensor, mask: torch.Tensor, sites: Sequence[str], layers: Sequence[int]
) -> SiteValues:
    """Run ``ids`` once (no gradients) and record ``sites`` at ``layers`` at every position."""
    with torch.inference_mode(), lm.record(layers, positions="all", sites=sites) as rec:
        logits = last_logits(lm, ids, mask)
    return SiteValues({(layer, site): rec[layer, site] for layer in layers for site in sites}, logits)


@contextmanager
def capturing(lm: LanguageModel, sites: Sequence[str], layers: Sequence[int]) -> Iterator[dict[SiteKey, torch.Tensor]]:
    """While the block runs, each forward pass stores ``sites``' values *in the autograd graph* (not
    detached) under (layer, site); the embeddings are made a leaf that requires grad, so gradients
    reach every site whether or not the model's parameters require them."""
    captured: dict[SiteKey, torch.Tensor] = {}
    hooks = HookSet()

    def leaf(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    def keeper(key: SiteKey) -> Callable[[torch.Tensor], None]:
        return lambda hidden: captured.__setitem__(key, hidden)

    try:
        hooks.forward(lm.model.get_input_embeddings(), leaf)  # type: ignore[operator]
        for layer in layers:
            for site in sites:
                part, reads = SITES[site]
                hooks.observe(lm.block_part(layer, part), reads, keeper((layer, site)))
        yield captured
    finally:
        hooks.remove_all()


def values_and_grad_passes(
    lm: LanguageModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    sites: Sequence[str],
    layers: Sequence[int],
    score: Callable[[torch.Tensor], torch.Tensor],
    before_each: Sequence[Callable[[], None]],
) -> Generator[tuple[SiteValues, dict[SiteKey, torch.Tensor]], None, None]:
    """One forward pass, then one backward pass per entry of ``before_each`` (called just before it, to
    set what shapes that pass: a RelP rule switch); yields the values and each pass's gradients. The
    graph is kept until the last pass; this generator keeps no reference to a pass's gradients once it
    has yielded them. While it is suspended the capture hooks stay on ``lm`` and gradients stay enabled:
    do not run the model between passes (close the generator first, e.g. with ``contextlib.closing``)."""
    with torch.enable_grad(), capturing(lm, sites, layers) as captured:
        logits = last_logits(lm, ids, mask)
        keys = list(captured)
        inputs = [captured[k] for k in keys]  # taken now: another forward pass would overwrite ``captured``
        target = score(logits)
        values = SiteValues({k: captured[k].detach() for k in keys}, logits.detach())
        for index, prepare in enumerate(before_each):
            prepare()
            grads = torch.autograd.grad(target, inputs, allow_unused=True, retain_graph=index < len(before_each) - 1)
            pass_grads = {
                k: (torch.zeros_like(values.values[k]) if g is None else g.detach())
                for k, g in zip(keys, grads, strict=True)
            }
            del grads
            yield values, pass_grads
            del pass_grads


def unit_shape(lm: LanguageModel, values: dict[SiteKey, torch.Tensor], num_tokens: int) -> UnitShape:
    """How many positions, heads (and their width) and neurons the recorded values have."""
    heads = int(lm.model.config.num_attention_heads)  # type: ignore[union-attr, arg-type]
    widths = {site: v.shape[-1] for (_, site), v in values.items()}
    head_width = widths.get("attn_heads", heads)
    return UnitShape(num_tokens, heads, head_width // heads, widths.get("mlp_act", 0))
