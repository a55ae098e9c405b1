"""Exact activation patching, batched: one batch row per (patched site, pair), many sites per forward pass.

A :class:`PatchRun` is a base run (the prompts that are run) and, for every (layer, site), the source
activations written into it: clean activations into the corrupted run for denoising patching, or
zeros / means / resampled activations into the clean run for an ablation (:mod:`.ablation`). The
effect of a site is ``mean over pairs of metric(base with the site patched) - metric(base)``.

Batching: a chunk of ``k`` sites runs as one forward pass over the base prompts repeated ``k`` times
(row ``i * k + j`` = pair ``i``, site ``j``); each touched (layer, site) gets one edit hook (through
:meth:`LanguageModel.edit`) that writes every chunk site's unit into its own rows. Sites come in layer
order, so the sites of one layer share as few passes as ``max_rows`` allows. A site whose source equals
the base value everywhere it patches (a position before the prompts differ) is a no-op: its effect is
exactly 0 and it is not run. Columns before the first one any patch changes are computed once: their
key/value cache is copied into every patched pass, which then runs only the remaining columns.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from residlab.analyses.patching.activations import SiteKey
from residlab.analyses.patching.metrics import Metric, MetricTargets
from residlab.analyses.patching.sites import FAMILIES, PatchSite, unit_selector

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

Selector = tuple[slice | int, slice]


@dataclass(frozen=True)
class PatchRun:
    """The prompts that run (``ids``, ``mask``), their own activations and logits, and what is patched in."""

    ids: torch.Tensor  # [pairs, tokens]
    mask: torch.Tensor  # [pairs, tokens]
    targets: MetricTargets
    base: dict[SiteKey, torch.Tensor]  # [pairs, tokens, width]: the run's own values
    sources: dict[SiteKey, torch.Tensor]  # [pairs, tokens, width]: the values patched in
    base_logits: torch.Tensor  # [pairs, vocab]

    @property
    def num_pairs(self) -> int:
        return int(self.ids.shape[0])

    def base_score(self, metric: Metric) -> float:
        return float(metric(self.base_logits, self.targets).mean())


def _parts(site: PatchSite, head_dim: int) -> list[tuple[SiteKey, Selector]]:
    family = FAMILIES[site.family]
    selector = unit_selector(family, site.index, head_dim)
    return [((layer, family.site), selector) for layer in site.layers]


def is_noop(run: PatchRun, site: PatchSite, head_dim: int) -> bool:
    """Whether patching ``site`` writes exactly the values the base run already has."""
    return all(
        torch.equal(run.sources[key][:, cols, chans], run.base[key][:, cols, chans])
        for key, (cols, chans) in _parts(site, head_dim)
    )


def shared_prefix(run: PatchRun) -> int:
    """How many leading columns every source equals its base value (all rows, all channels): patching
    never changes them, so their keys and values are computed once and reused by every patched pass."""
    first = run.ids.shape[1]
    for key, source in run.sources.items():
        differs = (source != run.base[key]).flatten(2).any(-1).any(0).nonzero()
        if len(differs):
            first = min(first, int(differs[0]))
    return first


@dataclass(frozen=True)
class Prefix:
    """The base run's key/value cache over its first ``columns`` columns (``None``: no prefix)."""

    columns: int
    cache: Any


def compute_prefix(lm: LanguageModel, run: PatchRun, columns: int) -> Prefix:
    """Run the first ``columns`` columns of the base prompts once, keeping their cache."""
    if columns == 0:
        return Prefix(0, None)
    with torch.inference_mode():
        out = lm.model(
            input_ids=run.ids[:, :columns],
            attention_mask=run.mask[:, :columns],
            position_ids=(run.mask.cumsum(-1) - 1).clamp(min=0)[:, :columns],
            use_cache=True,
        )
    cache = getattr(out, "cache", None)
    return Prefix(columns, cache if cache is not None else out.past_key_values)


def _writer(
    rows: list[tuple[int, Selector]], source: torch.Tensor, copies: int, offset: int
) -> Callable[..., torch.Tensor]:
    """An edit function writing ``source``'s selected units into each chunk site's rows (row = pair *
    copies + site); the pass starts at column ``offset`` (after the shared prefix)."""
    source = source[:, offset:]

    def write(value: torch.Tensor, ctx: object) -> torch.Tensor:
        new = value.clone()
        for j, (cols, chans) in rows:
            cols = cols - offset if isinstance(cols, int) else cols
            new[j::copies, cols, chans] = source[:, cols, chans].to(value.dtype)
        return new

    return write


def patched_scores(
    lm: LanguageModel,
    run: PatchRun,
    sites: Sequence[PatchSite],
    metric: Metric,
    head_dim: int,
    prefix: Prefix = Prefix(0, None),
) -> torch.Tensor:
    """[len(sites)] mean metric over pairs with each site patched, all sites in one forward pass over
    the columns after ``prefix`` (whose cache is copied, never changed)."""
    copies, start = len(sites), prefix.columns
    writes: dict[SiteKey, list[tuple[int, Selector]]] = defaultdict(list)
    for j, site in enumerate(sites):
        for key, selector in _parts(site, head_dim):
            writes[key].append((j, selector))
    ids, mask = run.ids.repeat_interleave(copies, 0), run.mask.repeat_interleave(copies, 0)
    kwargs: dict[str, Any] = dict(
        input_ids=ids[:, start:],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, start:],
        use_cache=prefix.cache is not None,
    )
    if prefix.cache is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(copies)
        kwargs[_cache_kwarg(lm)] = cache
    if "logits_to_keep" in inspect.signature(type(lm.model).forward).parameters:
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode(), ExitStack() as stack:
        for (layer, name), rows in writes.items():
            stack.enter_context(lm.edit(layer, name, _writer(rows, run.sources[layer, name], copies, start)))
        logits = lm.model(**kwargs).logits[:, -1, :]
    return metric(logits, run.targets.repeat_interleave(copies)).view(run.num_pairs, copies).mean(0)


def _cache_kwarg(lm: LanguageModel) -> str:
    return "cache" if "cache" in inspect.signature(type(lm.model).forward).parameters else "past_key_values"


def exact_effects(
    lm: LanguageModel,
    run: PatchRun,
    sites: Sequence[PatchSite],
    metric: Metric,
    head_dim: int,
    *,
    max_rows: int = 256,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """[len(sites)] exact patching effects: metric(patched) - metric(base), averaged over pairs.

    ``max_rows`` bounds a forward pass's batch (sites per pass = max_rows // pairs, at least 1);
    ``reuse_prefix`` computes the columns no patch changes once (:func:`shared_prefix`)."""
    effects = torch.zeros(len(sites), dtype=torch.float64)
    todo = [i for i, site in enumerate(sites) if not is_noop(run, site, head_dim)]
    prefix = compute_prefix(lm, run, shared_prefix(run) if reuse_prefix and todo else 0)
    per_pass = max(1, max_rows // run.num_pairs)
    base = run.base_score(metric)
    chunks = [todo[i : i + per_pass] for i in range(0, len(todo), per_pass)]
    for chunk in tqdm(chunks, desc="exact patching", unit="pass", disable=not progress, leave=False):
        scores = patched_scores(lm, run, [sites[i] for i in chunk], metric, head_dim, prefix)
        effects[chunk] = scores.double().cpu() - base
    return effects
