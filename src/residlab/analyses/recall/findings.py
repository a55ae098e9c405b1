"""Whether the paper's three findings hold on a model, decided by stated thresholds on the numbers.

1. **Mover heads**: the top candidate attends to the subject (attention weight >= ``MOVER_ATTENTION``)
   and writes the answer (DLA onto answer - wrong > 0), and mean-ablating the top-k candidates lowers
   the logit difference more than ``RANDOM_FACTOR`` x as much as ablating k random other heads.
2. **MLP gating / amplification**: under that knockout the MLPs' own DLA onto answer - wrong falls,
   by at least ``MLP_SHARE`` of the total drop: later MLPs carry (amplify) what the heads brought.
3. **Final-layer suppression**: the last layer's direct effect on the answer, relative to the mean
   logit, is negative, and mean-ablating the last layer's attention and MLP raises the answer's
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
    centred = final.attn_dla_centred + final.mlp_dla_centred
    mean_both = final.ablation("attn+mlp", "mean")
    zero_both = final.ablation("attn+mlp", "zero")
    if mean_both is None or zero_both is None:
        return Finding("final_layer_suppression", None, "the last layer was not ablated.")
    holds = centred < 0 and mean_both.prob_change > 0
    return Finding(
        "final_layer_suppression",
        holds,
        f"layer {final.layer}'s direct effect on the answer relative to the mean logit: attention "
        f"{final.attn_dla_centred:+.2f}, MLP {final.mlp_dla_centred:+.2f} (negative on {final.share_suppressed:.0%} "
        f"of prompts; the answer's whole centred logit is {final.mean_answer_logit_centred:+.2f}). Mean-ablating "
        f"its attention and MLP changes p(answer) by {mean_both.prob_change:+.3f} and accuracy by "
        f"{mean_both.accuracy_change:+.1%}; zeroing them: {zero_both.prob_change:+.3f} / {zero_both.accuracy_change:+.1%}.",
    )


def judge_findings(result: RecallResult) -> list[Finding]:
    """The three findings, judged on ``result``'s numbers (see the module docstring)."""
    return [_movers(result), _mlp_gating(result), _suppression(result)]
