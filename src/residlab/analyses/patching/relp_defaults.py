"""Which RelP rules run when the caller names none: a small typed table keyed by architecture family.

The table lives here, beside the rules, rather than in :mod:`residlab.models.architectures`: the
architecture map says where a model's parts are, which every analysis reads; which LRP rules make RelP
most faithful is a measured fact about RelP on that family, chosen by a benchmark, and belongs to the
patching package (the models layer must not know about analyses).

How the table was chosen (benchmarks/patching.py ``--split train``, saved under ``"selection"`` in
benchmarks/results/patching.json): every one of the 16 subsets of the four rules was scored on TRAIN
prompt pairs (:data:`~residlab.data.prompt_pairs.PAIR_SPLITS`: no prompt or country in common with the
reported eval pairs) by Pearson r against exact patching; for each group of component families
(resid + mlp, attn + heads) the subset with the best minimum r over the group's families across IOI
and capitals is its rule set. Two groups, two backward passes: one rule set cannot serve both on
Qwen2 (see the table's comment), and a pass per component family would cost a third pass for 0.01.
The table is per architecture family, not global, because which rule helps is a measured property of
a model family (in the earlier one-rule-out ablation, leaving out the AH-rule helped SmolLM2 on IOI in
every component family but cost Qwen's resid and mlp), and a family is entered only once both its
train runs exist. Explicit rules always win; a family with no entry gets every rule, and the choice
says so (never silently).

Gradients averaged along the input path (``ig_steps`` > 0, :mod:`.path`) change which rules help: the
path takes over much of what the AH-rule did (the softmax that switches between names is integrated
instead of linearised at one end), so :data:`PATH_RULES` holds a second table, chosen the same way at
8 path points (benchmarks/patching_path.py ``--split train``, benchmarks/results/patching_path.json),
used for any step count; a family without an entry there keeps its one-point default and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from residlab.analyses.patching.relp import NO_RULES, RelpRules
from residlab.analyses.patching.sites import FAMILIES
from residlab.core.errors import ResidlabError

SELECTION = "chosen on train pairs (per family group: min Pearson over its families, IOI + capitals)"
PATH_SELECTION = (
    "chosen on train pairs with gradients at 8 input-path points (per family group: min Pearson over its "
    "families, IOI + capitals)"
)


@dataclass(frozen=True)
class FamilyRules:
    """RelP's rules per component family: ``default`` for every family not in ``groups``, whose entries
    name families that run with other rules. Each distinct rule set costs one backward pass.
    ``default`` None leaves the other families to the architecture's table (:meth:`over`)."""

    default: RelpRules | None
    groups: tuple[tuple[tuple[str, ...], RelpRules], ...] = ()

    def __post_init__(self) -> None:
        named = [family for names, _ in self.groups for family in names]
        unknown = sorted(set(named) - set(FAMILIES))
        if unknown or len(named) != len(set(named)):
            raise ResidlabError(
                f"RelP rule groups name {'unknown families ' + ', '.join(unknown) if unknown else 'a family twice'}.",
                hint=f"name each of {', '.join(FAMILIES)} in one group at most.",
            )

    def for_family(self, family: str) -> RelpRules:
        """The rules the estimate of ``family`` (resid, attn, mlp, heads, neurons) is computed with."""
        rules = next((rules for names, rules in self.groups if family in names), self.default)
        if rules is None:
            raise ResidlabError(f"no RelP rules for {family}.", hint="complete the rules with FamilyRules.over().")
        return rules

    def over(self, base: FamilyRules) -> FamilyRules:
        """These rules where they name a family (or set a default), ``base``'s for the rest."""
        named = {family for names, _ in self.groups for family in names}
        kept = tuple(
            (rest, rules) for names, rules in base.groups if (rest := tuple(f for f in names if f not in named))
        )
        default = self.default if self.default is not None else base.default
        return FamilyRules(default, self.groups + kept)

    def passes(self, families: Sequence[str]) -> dict[RelpRules, tuple[str, ...]]:
        """The distinct rule sets ``families`` need, each with the families it serves (one pass each)."""
        out: dict[RelpRules, tuple[str, ...]] = {}
        for family in families:
            rules = self.for_family(family)
            out[rules] = (*out.get(rules, ()), family)
        return out


DEFAULT_RULES: dict[str, FamilyRules] = {
    # qwen2.5-coder-0.5b-instruct, 16 IOI + 16 capitals train pairs (benchmarks/results/patching.json,
    # "selection"). The AH-rule splits the families: it lifts resid and mlp (IOI train 0.558 -> 0.830 and
    # 0.552 -> 0.902 with norm + activation) but costs attn and heads (0.951 -> 0.874, 0.943 -> 0.666),
    # because IOI runs through heads that move other heads' queries and keys, the path it detaches.
    # So two passes: resid/mlp with norm + activation + attention (min r 0.830), attn/heads with norm +
    # activation (min r 0.943); the half rule costs in both groups (one pass with it: 0.732).
    "qwen2": FamilyRules(
        default=RelpRules(gated=False),
        groups=((("attn", "heads"), RelpRules(attention=False, gated=False)),),
    ),
    # llama (SmolLM2-135M-Instruct), 16 IOI + 16 capitals train pairs: the same resid/mlp set (min r 0.866;
    # every rule 0.826); attn/heads with norm + activation + gated (min r 0.963; with the AH-rule 0.78).
    "llama": FamilyRules(
        default=RelpRules(gated=False),
        groups=((("attn", "heads"), RelpRules(attention=False)),),
    ),
    # gemma3_text (Gemma-3-270M), 16 IOI + 16 capitals train pairs: resid/mlp with norm + attention (min r
    # 0.985; every rule 0.872), attn/heads with norm + gated (min r 0.946; with the AH-rule IOI attn 0.87).
    "gemma3_text": FamilyRules(
        default=RelpRules(activation=False, gated=False),
        groups=((("attn", "heads"), RelpRules(activation=False, attention=False)),),
    ),
}


PATH_RULES: dict[str, FamilyRules] = {
    # qwen2.5-coder-0.5b-instruct, the same train pairs, 8 path points: resid/mlp with norm + activation
    # (min r 0.970; with the AH-rule 0.900), attn/heads with the plain gradient (min r 0.953; norm +
    # activation 0.940). At one point the AH-rule had been best for resid/mlp (0.830).
    "qwen2": FamilyRules(default=RelpRules(attention=False, gated=False), groups=((("attn", "heads"), NO_RULES),)),
    # llama (SmolLM2-135M-Instruct), 8 points: norm + activation for every family, one pass (min r 0.991
    # resid/mlp, 0.968 attn/heads).
    "llama": FamilyRules(default=RelpRules(attention=False, gated=False)),
    # gemma3_text (Gemma-3-270M), 8 points: resid/mlp keep norm + attention (min r 0.985), attn/heads the
    # plain gradient (min r 0.975; its one-point norm + gated 0.946).
    "gemma3_text": FamilyRules(
        default=RelpRules(activation=False, gated=False), groups=((("attn", "heads"), NO_RULES),)
    ),
}


@dataclass(frozen=True)
class RuleChoice:
    """The rules RelP runs with and where they came from (``source``: explicit, default or fallback)."""

    rules: FamilyRules
    source: str


def choose_rules(
    family: str, explicit: RelpRules | FamilyRules | None = None, *, along_path: bool = False
) -> RuleChoice:
    """``explicit`` when given (one :class:`RelpRules` serves every component family; a
    :class:`FamilyRules` without a default leaves the families it does not name to the table); else the
    architecture family's default from :data:`PATH_RULES` (``along_path``: gradients averaged along the
    input path) or :data:`DEFAULT_RULES`; else every rule, with a source that says no default was chosen
    for ``family``."""
    if along_path and family in PATH_RULES:
        base = RuleChoice(PATH_RULES[family], f"input-path default for {family}, {PATH_SELECTION}")
    elif family in DEFAULT_RULES:
        note = " (no input-path choice measured for it: its one-point default)" if along_path else ""
        base = RuleChoice(DEFAULT_RULES[family], f"default for {family}, {SELECTION}{note}")
    else:
        base = RuleChoice(FamilyRules(RelpRules()), f"fallback: no default chosen for {family}, so every rule")
    if explicit is None:
        return base
    if isinstance(explicit, RelpRules):
        return RuleChoice(FamilyRules(explicit), "explicit (given by the caller)")
    if explicit.default is not None:
        return RuleChoice(explicit, "explicit (given by the caller)")
    named = ", ".join(f for names, _ in explicit.groups for f in names)
    return RuleChoice(explicit.over(base.rules), f"explicit for {named} (given by the caller); the rest: {base.source}")
