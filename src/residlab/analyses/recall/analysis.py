"""``analyze_recall``: the factual-recall analysis of Lv et al. 2024 (arXiv 2403.19521) on any model.

One clean pass over the prompts gives the DLA of every head and MLP (see
:mod:`~residlab.analyses.recall.dla`), each head's attention from the last position to the subject,
and the per-position means the ablations use. Mover-head candidates are ranked by
``mean over prompts of attention-to-subject x DLA(answer - wrong answer)``: heads that read the
subject and write what tells the answer apart. The top ``k`` are mean-ablated together for each
``k`` (the largest ``k`` also against ``k`` random other heads), and the change of every later MLP's DLA
under the largest knockout measures how much of the heads' effect runs through MLPs. The last
layer's direct effect on the answer is read from the DLA, and its attention and MLP are removed
(zero and mean ablation) to see what that does to accuracy and the answer's probability.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from residlab.analyses.recall.ablation import (
    ABLATION_MODES,
    Head,
    PositionMeans,
    ablate_branch,
    knock_out_heads,
    means_recording,
)
from residlab.analyses.recall.attention import LastRowAttention
from residlab.analyses.recall.dla import ANSWER, WRONG, BatchDLA, dla_recording, last_logits, measure_dla, num_heads
from residlab.analyses.recall.encoding import RecallBatch, encode_prompts, recall_batches
from residlab.analyses.recall.findings import judge_findings
from residlab.analyses.recall.result import (
    BranchAblation,
    FinalLayerEffect,
    HeadCandidate,
    Knockout,
    Outcome,
    RecallResult,
)
from residlab.core.errors import ResidlabError
from residlab.core.types import Log
from residlab.data.recall_prompts import RecallPrompt

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

Conditioner = Callable[[ExitStack], None]  # enters a condition's edits on the stack


def _clean_pass(
    lm: LanguageModel, batches: Sequence[RecallBatch], means: PositionMeans, progress: bool
) -> tuple[BatchDLA, torch.Tensor]:
    """DLA, attention to the subject [n, layers, heads] (NaN without subject), and the means."""
    parts, attention = [], []
    for rb in tqdm(batches, desc="clean pass", disable=not progress, leave=False):
        with dla_recording(lm) as rec, means_recording(lm) as all_rec, LastRowAttention(lm) as att:
            logits = last_logits(lm, rb)
        means.add_recording(all_rec, rb.batch.attention_mask.bool())
        parts.append(measure_dla(lm, rb, rec, logits))
        subject = rb.subject_mask.float()
        rows = torch.stack([att.rows[layer] for layer in range(lm.num_layers)], dim=1)  # [n, L, H, keys]
        weight = torch.einsum("nlhk,nk->nlh", rows, subject).cpu()
        weight[~rb.subject_mask.any(dim=1).cpu()] = float("nan")
        attention.append(weight)
    return BatchDLA.cat(parts), torch.cat(attention)


def _run(lm: LanguageModel, batches: Sequence[RecallBatch], condition: Conditioner) -> BatchDLA:
    """A pass over every batch under the edits ``condition`` enters (entered before the recording, so
    the recording sees the edited values)."""
    parts = []
    for rb in batches:
        with ExitStack() as stack:
            condition(stack)
            rec = stack.enter_context(dla_recording(lm))
            logits = last_logits(lm, rb)
        parts.append(measure_dla(lm, rb, rec, logits))  # after the edits are gone: it runs the norms itself
    return BatchDLA.cat(parts)


def outcome(dla: BatchDLA) -> Outcome:
    """Accuracy, the answer's mean probability and the mean logit difference (answer - wrong)."""
    return Outcome(
        accuracy=float(dla.correct.float().mean()),
        mean_prob=float(dla.prob.mean()),
        mean_logit_diff=float((dla.logit[:, 0] - dla.logit[:, 1]).mean()),
    )


def rank_heads(dla: BatchDLA, attention: torch.Tensor, top: int) -> list[HeadCandidate]:
    """The ``top`` heads by mean(attention to subject x DLA(answer - wrong)) (NaN-free prompts only)."""
    diff = dla.heads[..., ANSWER] - dla.heads[..., WRONG]
    score = torch.nanmean(attention * diff, dim=0)
    if bool(torch.isnan(score).all()):
        score = diff.mean(dim=0)  # no prompt names its subject: rank by DLA alone
    order = torch.argsort(torch.nan_to_num(score, nan=float("-inf")).flatten(), descending=True)[:top].tolist()
    heads = score.shape[1]
    return [
        HeadCandidate(
            layer=i // heads,
            head=i % heads,
            score=float(score.flatten()[i]),
            subject_attention=float(torch.nanmean(attention[:, i // heads, i % heads])),
            dla=float(dla.heads[:, i // heads, i % heads, ANSWER].mean()),
            dla_diff=float(diff[:, i // heads, i % heads].mean()),
            mlp_along=float(torch.nanmean(dla.mlp_along_head[:, i // heads, i % heads])),
        )
        for i in order
    ]


def _heads_out(lm: LanguageModel, heads: Sequence[Head], means: PositionMeans) -> Conditioner:
    return lambda stack: knock_out_heads(lm, heads, means, stack)


def _knockouts(
    lm: LanguageModel,
    batches: Sequence[RecallBatch],
    clean: BatchDLA,
    candidates: list[HeadCandidate],
    ks: Sequence[int],
    draws: int,
    seed: int,
    means: PositionMeans,
) -> list[Knockout]:
    base = outcome(clean)
    results = []
    all_heads = [(layer, h) for layer in range(lm.num_layers) for h in range(num_heads(lm))]
    for k in ks:
        chosen: list[Head] = [(c.layer, c.head) for c in candidates[:k]]
        ablated = _run(lm, batches, _heads_out(lm, chosen, means))
        others = [h for h in all_heads if h not in chosen]
        rng = random.Random(seed + k)
        controls = []
        for _ in range(draws if len(others) >= k and k == ks[-1] else 0):  # a control for the largest k only
            picked = rng.sample(others, k)
            controls.append(outcome(_run(lm, batches, _heads_out(lm, picked, means))))
        results.append(Knockout.measure(k, chosen, base, outcome(ablated), controls, clean, ablated))
    return results


def _final_layer(
    lm: LanguageModel, batches: Sequence[RecallBatch], clean: BatchDLA, means: PositionMeans
) -> FinalLayerEffect:
    last = lm.num_layers - 1
    base = outcome(clean)
    ablations = []
    for branches in (("attn",), ("mlp",), ("attn", "mlp")):
        for mode in ABLATION_MODES:

            def condition(stack: ExitStack, branches=branches, mode=mode) -> None:
                for branch in branches:
                    ablate_branch(lm, last, branch, mode, means, stack)

            after = outcome(_run(lm, batches, condition))
            ablations.append(BranchAblation.measure("+".join(branches), mode, base, after))
    return FinalLayerEffect.measure(clean, tuple(ablations))


def analyze_recall(
    lm: LanguageModel,
    prompts: Sequence[RecallPrompt],
    *,
    knockout_ks: Sequence[int] = (1, 3, 5, 10),
    random_draws: int = 3,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    log: Log = lambda message: None,
) -> RecallResult:
    """Run the factual-recall analysis on ``prompts`` (see the module docstring)."""
    ks = sorted({int(k) for k in knockout_ks})
    total_heads = lm.num_layers * num_heads(lm)
    if not ks or ks[0] < 1 or ks[-1] > total_heads:
        raise ResidlabError(
            f"knockout sizes must be between 1 and the model's {total_heads} heads, got {list(knockout_ks)}.",
            hint="pass --knockout-k 1,3,5,10 (or smaller).",
        )
    if random_draws < 0:
        raise ResidlabError(f"random_draws must be >= 0, got {random_draws}.", hint="pass 0 or more.")
    encoded = encode_prompts(lm, prompts)
    batches = list(recall_batches(lm, encoded, batch_size))
    means = PositionMeans()
    log(f"clean pass over {len(prompts)} prompts")
    clean, attention = _clean_pass(lm, batches, means, progress)
    candidates = rank_heads(clean, attention, ks[-1])
    log(f"knockouts of the top {ks} heads ({random_draws} random controls each)")
    knockouts = _knockouts(lm, batches, clean, candidates, ks, random_draws, seed, means)
    log("final-layer ablations")
    final = _final_layer(lm, batches, clean, means)
    return RecallResult.build(lm, prompts, encoded, clean, attention, candidates, knockouts, final, judge_findings)
