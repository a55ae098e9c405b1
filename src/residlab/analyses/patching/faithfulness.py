"""How faithful AtP and RelP are to exact patching: every method on the same sites, correlated per family.

:func:`measure_faithfulness` runs the clean and corrupted prompts once each (recording every site),
exact patching of every site of each family, and the estimates (AtP; RelP with its rules), timing each
method; :mod:`.report` turns the result into JSON, heatmaps and a markdown report.

Timing: ``exact`` counts the corrupted recording and its patching passes, per family; ``atp`` counts
the clean forward pass (the source activations) plus its one forward and backward pass, which serves
every family at once; ``relp`` the clean pass plus one shared forward pass and one backward pass per
distinct rule set the families need (:class:`~.relp_defaults.FamilyRules`; the rules change no value,
so the sets share the forward pass), all of it charged to every family. With ``ig_steps`` N > 0 the
estimates' gradients are averaged over N points of the input path (:mod:`.path`): N forward passes
shared by the rule sets, N backward passes per rule set, plus the corrupted run the deltas start from, all
charged to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from scipy import stats

from residlab.analyses.patching.activations import last_logits, record_values, unit_shape
from residlab.analyses.patching.attribution import InputPath, attribute, attribute_each, estimated_effects
from residlab.analyses.patching.exact import PatchRun, exact_effects, is_noop
from residlab.analyses.patching.metrics import MetricTargets, get_metric, metric_name
from residlab.analyses.patching.pairs import encode_pairs
from residlab.analyses.patching.path import path_points
from residlab.analyses.patching.relp import RelpRules
from residlab.analyses.patching.relp_defaults import FamilyRules, choose_rules
from residlab.analyses.patching.sites import get_families, site_grid
from residlab.core.errors import ResidlabError
from residlab.data.prompt_pairs import PromptPair

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

METHODS = ("exact", "atp", "relp")
ESTIMATES = ("atp", "relp")


@dataclass(frozen=True)
class FamilyEffects:
    """One family's effects: ``effects[method]`` is a [layers][units] grid (window starts x units)."""

    family: str
    unit: str  # position | head | neuron
    effects: dict[str, list[list[float]]]
    seconds: dict[str, float]
    pearson: dict[str, float] = field(default_factory=dict)  # estimate method -> r against exact
    spearman: dict[str, float] = field(default_factory=dict)
    num_sites: int = 0
    noop_sites: int = 0  # sites whose source equals the base value (effect exactly 0, not run)
    rules: tuple[str, ...] = ()  # the RelP rules this family's estimate ran with (one line per rule)


def correlation(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(Pearson r, Spearman rho) of two vectors; NaN where either is constant."""
    a, b = x.double().numpy(), y.double().numpy()
    if a.std() == 0 or b.std() == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(a, b)[0]), float(stats.spearmanr(a, b)[0])


def _family_effects(
    family: str,
    unit: str,
    units: int,
    effects: dict[str, torch.Tensor],
    seconds: dict[str, float],
    noop: int,
    rules: tuple[str, ...] = (),
) -> FamilyEffects:
    """Grids of every method's effects, and each estimate's correlations with exact patching."""
    pearson, spearman = {}, {}
    if "exact" in effects:
        for method in (m for m in effects if m != "exact"):
            pearson[method], spearman[method] = correlation(effects[method], effects["exact"])
    grids = {m: e.view(-1, units).tolist() for m, e in effects.items()}
    count = len(next(iter(effects.values())))
    return FamilyEffects(family, unit, grids, seconds, pearson, spearman, count, noop, rules)


def _rule_lines(families: list[FamilyEffects], passes: int) -> tuple[str, ...]:
    """The run's RelP rule lines: one pass's as they are; several passes' each prefixed by its families."""
    if passes <= 1:
        return families[0].rules if families else ()
    groups: dict[tuple[str, ...], list[str]] = {}
    for fam in families:
        groups.setdefault(fam.rules, []).append(fam.family)
    return tuple(f"[{', '.join(names)}] {line}" for rules, names in groups.items() for line in rules or ("none",))


def _check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ResidlabError(
            f"unknown patching method(s) {', '.join(unknown) or '(none)'}.", hint="use exact, atp, relp."
        )
    return list(dict.fromkeys(methods))


@dataclass(frozen=True)
class Faithfulness:
    """Everything one faithfulness run measured (see :mod:`.report` for the saved form)."""

    families: list[FamilyEffects]
    clean_score: float
    corrupted_score: float
    num_pairs: int
    tokens: tuple[str, ...]
    rules: tuple[str, ...]
    metric: str
    window: int
    rules_source: str = ""  # where RelP's rules came from (explicit, the family's default, a fallback)
    ig_steps: int = 0  # the estimates' gradients: at the corrupted run (0) or averaged over N path points


def measure_faithfulness(
    lm: LanguageModel,
    pairs: Sequence[PromptPair],
    *,
    families: Sequence[str] = ("resid", "attn", "mlp", "heads"),
    methods: Sequence[str] = METHODS,
    metric: str = "logit_diff",
    rules: RelpRules | FamilyRules | None = None,
    window: int = 1,
    max_rows: int = 256,
    ig_steps: int = 0,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> Faithfulness:
    """Exact patching and the estimates of every site of ``families`` on ``pairs`` (see the module doc);
    ``rules`` None: the model family's default RelP rules (:func:`~.relp_defaults.choose_rules`); one
    :class:`RelpRules` serves every component family, a :class:`FamilyRules` sets them per family.
    ``ig_steps`` > 0: both estimates average their gradients over that many points of the input path."""
    chosen, methods = get_families(families), _check_methods(methods)
    path_points(ig_steps)  # a negative count fails here, before any model run
    choice = choose_rules(lm.arch.family, rules, along_path=ig_steps > 0)
    passes = choice.rules.passes([f.name for f in chosen])
    if "relp" in methods:
        for pass_rules, names in passes.items():
            label = f" for {', '.join(names)}" if len(passes) > 1 else ""
            log(f"RelP rules{label}: {', '.join(pass_rules.names()) or 'none'} ({choice.source})")
    score = get_metric(metric)
    batch = encode_pairs(lm, pairs)
    layers = list(range(lm.num_layers))
    site_names = sorted({f.site for f in chosen})
    with torch.inference_mode():  # warm-up (lazy initialisation, allocator) outside every timed method
        last_logits(lm, batch.clean_ids[:1], batch.attention_mask[:1])
    started = time.perf_counter()
    clean = record_values(lm, batch.clean_ids, batch.attention_mask, site_names, layers)
    clean_seconds = time.perf_counter() - started
    started = time.perf_counter()
    corrupted = record_values(lm, batch.corrupted_ids, batch.attention_mask, site_names, layers)
    corrupted_seconds = time.perf_counter() - started
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.float().log_softmax(-1))
    run = PatchRun(batch.corrupted_ids, batch.attention_mask, targets, corrupted.values, clean.values, corrupted.logits)
    path = InputPath(batch.clean_ids, ig_steps)
    shape = unit_shape(lm, clean.values, batch.num_tokens)
    grids = {family.name: site_grid(family, lm.num_layers, shape, window=window) for family in chosen}
    # method -> component family -> (its estimated effects, the RelP rule lines they ran with). Each pass's
    # attribution (values and gradients of every site) is scored and dropped before the next pass runs.
    estimates: dict[str, dict[str, tuple[torch.Tensor, tuple[str, ...]]]] = {}
    seconds = {}
    for method in (m for m in methods if m in ESTIMATES):
        keys = list(clean.values)
        # Both are lazy: the passes run (and are timed) inside the loop, not where they are set up.
        if method == "relp":  # one forward pass shared by every rule set, one backward pass each
            groups = list(passes.values())
            attributions = attribute_each(lm, run.ids, run.mask, targets, score, keys, list(passes), path, corrupted)
        else:  # AtP: plain autograd
            groups = [tuple(f.name for f in chosen)]
            attributions = (
                attribute(lm, run.ids, run.mask, targets, score, keys, path=path, base=corrupted) for _ in groups
            )
        # along the path the corrupted run (recorded above) is where the deltas start: charged here too
        estimates[method], seconds[method] = {}, clean_seconds + (corrupted_seconds if ig_steps else 0.0)
        remaining = iter(groups)
        with closing(attributions):  # the rule hooks come off even if scoring fails
            started = time.perf_counter()
            for attribution in attributions:  # no zip: its reused tuple would keep the previous pass alive
                seconds[method] += time.perf_counter() - started
                for name in next(remaining):
                    estimate = estimated_effects(attribution, clean.values, grids[name], shape.head_dim, run.base)
                    estimates[method][name] = (estimate, attribution.rules)
                del attribution
                started = time.perf_counter()
        passes_text = f"{len(groups)} backward pass{'es' * (len(groups) > 1)}"
        along = f" at each of {ig_steps} points of the input path" if ig_steps else ""
        log(f"{method}: {seconds[method]:.2f} s for every site ({passes_text}{along})")
    results = []
    for family in chosen:
        sites = grids[family.name]
        family_seconds = {m: seconds[m] for m in estimates}
        effects: dict[str, torch.Tensor] = {}
        if "exact" in methods:
            started = time.perf_counter()
            effects["exact"] = exact_effects(
                lm, run, sites, score, shape.head_dim, max_rows=max_rows, progress=progress
            )
            family_seconds["exact"] = corrupted_seconds + time.perf_counter() - started
            log(f"exact {family.name}: {len(sites)} sites in {family_seconds['exact']:.1f} s")
        for method, by_family in estimates.items():
            effects[method] = by_family[family.name][0]
        noop = sum(is_noop(run, site, shape.head_dim) for site in sites)
        applied = estimates["relp"][family.name][1] if "relp" in estimates else ()
        results.append(
            _family_effects(family.name, family.unit, shape.count(family.unit), effects, family_seconds, noop, applied)
        )
    return Faithfulness(
        results,
        float(score(clean.logits, targets).mean()),
        run.base_score(score),
        batch.num_pairs,
        batch.tokens,
        _rule_lines(results, len(passes)) if "relp" in estimates else (),
        metric_name(metric),
        window,
        choice.source if "relp" in estimates else "",
        ig_steps if estimates else 0,  # exact patching alone takes no gradient anywhere
    )
