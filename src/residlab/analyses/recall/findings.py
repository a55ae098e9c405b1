"""Whether the paper's three findings hold on a model, decided by stated thresholds on the numbers.

1. **Mover heads**: the top candidate attends to the subject (attention weight >= ``MOVER_ATTENTION``)
   and writes the answer (DLA onto answer - wrong > 0), and mean-ablating the top-k candidates lowers
   the logit difference more than ``RANDOM_FACTOR`` x as much as ablating k random other heads.
2. **MLP gating / amplification**: under that knockout the MLPs' own DLA onto answer - wrong falls,
   by at least ``MLP_SHARE`` of the total drop: later MLPs carry (amplify) what the heads brought.
3. **Final-layer suppression**: the direct effect on the answer (relative to the mean logit) of the
   last layer's attention, MLP or both is negative, and mean-ablating that part raises the answer's
   probability.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from residlab.analyses.recall.result import Finding

if TYPE_CHECKING:
    from residlab.analyses.recall.result import RecallResult

MOVER_ATTENTION = 0.3
RANDOM_FACTOR = 2.0
MLP_SHARE = 0.25


def _movers(result: RecallResult) -> Finding:
    if not result.candidates or not result.knockouts:
        return Finding("mover_heads", None, "no head candidates were ranked.")
    top, ko = result.candidates[0], result.knockouts[-1]
    if result.prompts_with_subject == 0:
        return Finding("mover_heads", None, "no prompt names its subject: attention to it cannot be measured.")
    control = ko.random_drop_logit_diff if ko.random_draws else 0.0
    holds = (
        top.subject_attention >= MOVER_ATTENTION
        and top.dla_diff > 0
        and ko.drop_logit_diff > 0
        and ko.drop_logit_diff > RANDOM_FACTOR * max(control, 0.0)
    )
    return Finding(
        "mover_heads",
        holds,
        f"top candidate L{top.layer}H{top.head}: attention to the subject {top.subject_attention:.2f}, "
        f"DLA(answer - wrong) {top.dla_diff:+.2f}; mean-ablating the top {ko.k} heads lowers the logit "
        f"difference by {ko.drop_logit_diff:+.2f} (k random heads: {control:+.2f}) and accuracy "
        f"{ko.before.accuracy:.0%} -> {ko.after.accuracy:.0%}.",
    )


def _mlp_gating(result: RecallResult) -> Finding:
    if not result.knockouts:
        return Finding("mlp_amplification", None, "no knockout was run.")
    ko = result.knockouts[-1]
    share = ko.via_mlps / ko.drop_logit_diff if ko.drop_logit_diff > 0 else float("nan")
    holds = ko.drop_logit_diff > 0 and ko.via_mlps > 0 and share >= MLP_SHARE
    layer = max(range(len(ko.mlp_drop_per_layer)), key=ko.mlp_drop_per_layer.__getitem__)
    along = [c.mlp_along for c in result.candidates[: ko.k]]
    amplified = sum(1 for a in along if a > 0)
    return Finding(
        "mlp_amplification",
        holds,
        f"knocking out the top {ko.k} heads lowers the MLPs' DLA(answer - wrong) by {ko.via_mlps:+.2f} of a "
        f"{ko.drop_logit_diff:+.2f} total drop (share {share:.2f}; heads' own direct drop {ko.direct_drop:+.2f}); "
        f"largest at MLP {layer} ({ko.mlp_drop_per_layer[layer]:+.2f}). The next MLP's output along the head's "
        f"output: positive (amplifies) for {amplified} of {len(along)} heads, negative (erases) for the rest.",
    )


def _suppression(result: RecallResult) -> Finding:
    final = result.final_layer
    centred = {"attn": final.attn_dla_centred, "mlp": final.mlp_dla_centred}
    centred["attn+mlp"] = centred["attn"] + centred["mlp"]
    removed = {target: final.ablation(target, "mean") for target in centred}
    zeroed = {target: final.ablation(target, "zero") for target in centred}
    if any(a is None for a in (*removed.values(), *zeroed.values())):
        return Finding("final_layer_suppression", None, "the last layer was not ablated.")
    suppressing = [t for t in centred if centred[t] < 0 and removed[t].prob_change > 0]  # type: ignore[union-attr]
    changes = "; ".join(
        f"{t}: mean {removed[t].prob_change:+.3f} / {removed[t].accuracy_change:+.1%}, "  # type: ignore[union-attr]
        f"zero {zeroed[t].prob_change:+.3f} / {zeroed[t].accuracy_change:+.1%}"  # type: ignore[union-attr]
        for t in centred
    )
    return Finding(
        "final_layer_suppression",
        bool(suppressing),
        f"layer {final.layer}'s direct effect on the answer relative to the mean logit: attention "
        f"{final.attn_dla_centred:+.2f}, MLP {final.mlp_dla_centred:+.2f} (their sum negative on "
        f"{final.share_suppressed:.0%} of prompts; the answer's whole centred logit is "
        f"{final.mean_answer_logit_centred:+.2f}). Removing them changes p(answer) / accuracy by: {changes}."
        + (f" Suppressing: {', '.join(suppressing)}." if suppressing else ""),
    )


def judge_findings(result: RecallResult) -> list[Finding]:
    """The three findings, judged on ``result``'s numbers (see the module docstring)."""
    return [_movers(result), _mlp_gating(result), _suppression(result)]
