"""AtP and RelP: every site's patching effect estimated from one forward and one backward pass (or, along
the input path, one of each per point: :mod:`.path`).

``effect(site) ~ sum over the site's units of (source - base) * d metric / d base``, with the base run
differentiated by plain autograd (AtP, attribution patching) or with the LRP rules of :mod:`.relp`
active (RelP, whose "gradient" is the LRP relevance coefficient). The source activations come from a
run without gradients (the clean prompts for denoising patching; an ablation's replacements).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from residlab.analyses.patching.activations import SiteKey, SiteValues, record_values, values_and_grad_passes
from residlab.analyses.patching.metrics import Metric, MetricTargets
from residlab.analyses.patching.path import embeddings_between, path_points
from residlab.analyses.patching.relp import NO_RULES, RelpRules, relp_rules
from residlab.analyses.patching.relp_switch import RuleSwitch
from residlab.analyses.patching.sites import FAMILIES, PatchSite, SiteFamily
from residlab.core.errors import ResidlabError

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class Attribution:
    """The base run's values and the (rule-shaped) gradients of the mean metric at every (layer, site)."""

    values: dict[SiteKey, torch.Tensor]
    grads: dict[SiteKey, torch.Tensor]
    logits: torch.Tensor  # the base run's last logits
    mask: (
        torch.Tensor
    )  # [pairs, tokens] 0 = padding (whose values vary with the attention kernel, and count for nothing)
    rules: tuple[str, ...]  # the RelP rules that shaped the gradients (empty: AtP)
    steps: int = 0  # gradients averaged over this many points of the input path (0: at the base run)


@dataclass(frozen=True, eq=False)
class InputPath:
    """Where the gradients are taken: at the base run (``steps`` 0) or averaged over ``steps`` midpoints
    of the embedding path from the base prompts to ``clean_ids`` (:mod:`.path`)."""

    clean_ids: torch.Tensor
    steps: int = 0

    def __post_init__(self) -> None:
        path_points(self.steps)  # a negative count is an error here, not a silent one-point estimate


def attribute(
    lm: LanguageModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    targets: MetricTargets,
    metric: Metric,
    keys: Sequence[SiteKey],
    rules: RelpRules | None = None,
    path: InputPath | None = None,
    base: SiteValues | None = None,
) -> Attribution:
    """Run ``ids`` forward and backward once (per path point), with ``rules`` (RelP) or without (AtP)."""
    with closing(attribute_each(lm, ids, mask, targets, metric, keys, [rules], path, base)) as one:
        return next(one)  # closing: the hooks come off now


def union_of(rule_sets: Sequence[RelpRules]) -> RelpRules:
    """Every rule any of ``rule_sets`` uses (their epsilon must agree: it shapes the forward's hooks)."""
    if not rule_sets:
        raise ResidlabError("no RelP rule sets to join.", hint="give at least one RelpRules.")
    epsilons = {r.epsilon for r in rule_sets if r.activation}  # only the activation rule reads it
    if not epsilons:
        epsilons = {rule_sets[0].epsilon}
    if len(epsilons) != 1:
        raise ResidlabError(
            f"RelP rule sets that share one forward pass need one epsilon, got {sorted(epsilons)}.",
            hint="give every rule set with the activation rule the same epsilon (it shapes the forward "
            "pass's activation hooks).",
        )
    names = ("norm", "activation", "attention", "gated")
    return RelpRules(**{n: any(getattr(r, n) for r in rule_sets) for n in names}, epsilon=epsilons.pop())


def attribute_each(
    lm: LanguageModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    targets: MetricTargets,
    metric: Metric,
    keys: Sequence[SiteKey],
    rule_sets: Sequence[RelpRules | None],
    path: InputPath | None = None,
    base: SiteValues | None = None,
) -> Generator[Attribution, None, None]:
    """RelP with each of ``rule_sets``, in order: one forward pass shared by all (the rules change no
    value, :mod:`.relp_switch`), then one backward pass per set. Yields each set's attribution and keeps
    no reference to it afterwards: a consumer that drops it before asking for the next holds one set of
    gradients at a time. One set (``None``: AtP, plain autograd) takes no switch. Until the generator is
    exhausted or closed, the rule and capture hooks stay on ``lm``: use it in ``contextlib.closing`` and
    do not run the model between passes. With a ``path`` of N > 0 steps, every point runs to the end
    (one shared forward pass, one backward pass per set) before the first set is yielded: no hook stays on
    between yields, and every set's summed gradients are held until then (float32 sums). The deltas start
    at ``ids``' own run: ``base`` (its recorded values, if the caller has them) or a recording made here."""
    if not rule_sets:
        return
    sites = sorted({site for _, site in keys})
    layers = sorted({layer for layer, _ in keys})
    if path is not None and path.steps > 0:
        if base is None:  # the deltas start at the base run, not at a point of the path
            base = record_values(lm, ids, mask, sites, layers)
        at_one_point = lambda: attribute_each(lm, ids, mask, targets, metric, keys, rule_sets)  # noqa: E731
        yield from _along_path(lm, ids, mask, path, base, at_one_point, len(rule_sets))
        return
    score = lambda logits: metric(logits, targets).mean()  # noqa: E731
    if len(rule_sets) == 1:
        only = rule_sets[0]
        context: AbstractContextManager[list[str]] = relp_rules(lm, only) if only is not None else nullcontext([])
        with context as applied:
            with closing(values_and_grad_passes(lm, ids, mask, sites, layers, score, [lambda: None])) as one_pass:
                values, grads = next(one_pass)
        yield Attribution(values.values, grads, values.logits, mask, tuple(applied))
        return
    every = [NO_RULES if r is None else r for r in rule_sets]  # None: AtP
    switch = RuleSwitch(every[0])
    setters = [lambda rules=rules: setattr(switch, "active", rules) for rules in every]
    with relp_rules(lm, union_of(every), switch) as applied:
        with closing(values_and_grad_passes(lm, ids, mask, sites, layers, score, setters)) as passes:
            remaining = iter(every)
            for values, grads in passes:  # no zip: its reused tuple would keep the last pass's gradients
                rules = next(remaining)
                lines = tuple(line for line in applied if line.split(":")[0] in rules.names())
                attribution = Attribution(values.values, grads, values.logits, mask, lines)
                del grads
                yield attribution
                del attribution


def _along_path(
    lm: LanguageModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    path: InputPath,
    base: SiteValues,
    at_one_point: Callable[[], Generator[Attribution, None, None]],
    num_sets: int,
) -> Generator[Attribution, None, None]:
    """Each rule set's gradients (``at_one_point``'s passes, run at every point of ``path``) averaged
    over the points; the values and logits are ``base``'s (the run the deltas start from)."""
    points = path_points(path.steps)
    sums: list[dict[SiteKey, torch.Tensor]] = [{} for _ in range(num_sets)]
    lines: list[tuple[str, ...]] = [() for _ in range(num_sets)]
    for alpha in points:
        with embeddings_between(lm, path.clean_ids, ids, alpha), closing(at_one_point()) as passes:
            for index, attribution in enumerate(passes):
                for key, grad in attribution.grads.items():
                    grad = grad.float()  # bfloat16 sums over many points would lose the small terms
                    sums[index][key] = grad if key not in sums[index] else sums[index][key] + grad
                lines[index] = attribution.rules
                del attribution
    for index in range(num_sets):
        grads = {key: total / len(points) for key, total in sums[index].items()}
        sums[index] = {}  # hand the sums over: the consumer holds one set at a time
        yield Attribution(base.values, grads, base.logits, mask, lines[index], path.steps)
        del grads


def unit_scores(family: SiteFamily, delta: torch.Tensor, grad: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Estimated effect of each unit of one (layer, site): (delta * grad) summed over pairs and over the
    unit's positions and channels; [tokens], [heads] or [neurons]."""
    product = (delta.double() * grad.double()).sum(0)  # [tokens, width]
    if family.unit == "position":
        return product.sum(-1)
    if family.unit == "head":
        return product.sum(0).view(-1, head_dim).sum(-1)
    return product.sum(0)


def estimated_effects(
    attribution: Attribution,
    sources: dict[SiteKey, torch.Tensor],
    sites: Sequence[PatchSite],
    head_dim: int,
    base: dict[SiteKey, torch.Tensor] | None = None,
) -> torch.Tensor:
    """[len(sites)] estimates: each site's unit scores summed over its window's layers.

    ``base`` (default: the values of the differentiated pass) are the activations the deltas start
    from; pass the base run's recorded values to keep RelP's eager attention kernel from adding
    rounding-level deltas where the prompts agree (sites whose exact effect is exactly 0)."""
    base = attribution.values if base is None else base
    scores: dict[tuple[SiteKey, str], torch.Tensor] = {}
    out = torch.zeros(len(sites), dtype=torch.float64)
    for i, site in enumerate(sites):
        family = FAMILIES[site.family]
        for layer in site.layers:
            key = (layer, family.site)
            if (key, family.name) not in scores:
                delta = sources[key].to(base[key].device) - base[key]
                delta = delta * attribution.mask.unsqueeze(-1).to(delta.dtype)
                scores[key, family.name] = unit_scores(family, delta, attribution.grads[key], head_dim).cpu()
            out[i] += scores[key, family.name][site.index]
    return out
