"""Which RelP rules run when the caller names none: a small typed table keyed by architecture family.

The table lives here, beside the rules, rather than in :mod:`residlab.models.architectures`: the
architecture map says where a model's parts are, which every analysis reads; which LRP rules make RelP
most faithful is a measured fact about RelP on that family, chosen by a benchmark, and belongs to the
patching package (the models layer must not know about analyses).

How the table was chosen (benchmarks/patching.py ``--split train``, saved under ``"selection"`` in
benchmarks/results/patching.json): every one of the 16 subsets of the four rules was scored on TRAIN
prompt pairs (:data:`~residlab.data.prompt_pairs.PAIR_SPLITS`: no prompt or country in common with the
reported eval pairs) by the minimum Pearson r against exact patching over resid, attn and mlp across
IOI and capitals; the best subset per family is its default. The table is per family, not global,
because which rule helps is a measured property of a model family (in the earlier one-rule-out
ablation, leaving out the AH-rule helped SmolLM2 on IOI in every family but cost Qwen's resid and
mlp), and a family is entered only once both its train runs exist. Explicit
rules always win; a family with no entry gets every rule, and the choice says so (never silently).
"""

from __future__ import annotations

from dataclasses import dataclass

from residlab.analyses.patching.relp import RelpRules

SELECTION = "chosen on train pairs (min Pearson over resid/attn/mlp, IOI + capitals)"

DEFAULT_RULES: dict[str, RelpRules] = {
    # qwen2.5-coder-0.5b-instruct, 16 IOI + 16 capitals train pairs: min r over resid/attn/mlp 0.830
    # (every rule 0.732, none = AtP -0.020); the half rule is what costs (IOI mlp 0.902 -> 0.787).
    "qwen2": RelpRules(gated=False),
    # llama (SmolLM2-135M): the same subset wins on its IOI train pairs (0.866; every rule 0.826), but
    # its capitals train run is missing, so the family keeps the named fallback until it is measured.
}


@dataclass(frozen=True)
class RuleChoice:
    """The rules RelP runs with and where they came from (``source``: explicit, default or fallback)."""

    rules: RelpRules
    source: str


def choose_rules(family: str, explicit: RelpRules | None = None) -> RuleChoice:
    """``explicit`` when given; else the family's default from :data:`DEFAULT_RULES`; else every rule,
    with a source that says no default was chosen for ``family``."""
    if explicit is not None:
        return RuleChoice(explicit, "explicit (given by the caller)")
    if family in DEFAULT_RULES:
        return RuleChoice(DEFAULT_RULES[family], f"default for {family}, {SELECTION}")
    return RuleChoice(RelpRules(), f"fallback: no default chosen for {family}, so every rule")
