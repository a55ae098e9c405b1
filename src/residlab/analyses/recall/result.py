"""What the factual-recall analysis measured: typed value objects, the result, its summary and figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.recall.dla import ANSWER, VOCAB_MEAN, WRONG, BatchDLA, num_heads, softcap
from residlab.analyses.result import AnalysisResult, figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.analyses.recall.encoding import EncodedPrompt
    from residlab.data.recall_prompts import RecallPrompt
    from residlab.models.lm import LanguageModel


def _mean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x.float())) if x.numel() else float("nan")


@dataclass(frozen=True)
class Outcome:
    """How the model does on the prompts under one condition."""

    accuracy: float  # share of prompts whose top-1 next token is the answer's first token
    mean_prob: float  # mean probability of the answer's first token
    mean_logit_diff: float  # mean logit(answer) - logit(wrong answer)


@dataclass(frozen=True)
class HeadCandidate:
    """A mover-head candidate: its rank score, attention to the subject and direct effects."""

    layer: int
    head: int
    score: float  # mean over prompts of subject_attention x dla_diff
    subject_attention: float  # attention weight from the last position to the subject's tokens (sum)
    dla: float  # DLA onto the answer's logit
    dla_diff: float  # DLA onto logit(answer) - logit(wrong)
    mlp_along: float  # the next MLP's output along the head's output, / ||head output||^2 (>0 amplifies)


@dataclass(frozen=True)
class Knockout:
    """Mean-ablating the top ``k`` candidates together, against ``k`` random other heads."""

    k: int
    heads: list[list[int]]  # [layer, head] pairs
    before: Outcome
    after: Outcome
    drop_logit_diff: float
    drop_accuracy: float
    random_drop_logit_diff: float  # mean over the random draws (NaN without any)
    random_drop_accuracy: float
    random_draws: int
    direct_drop: float  # how much the knocked-out heads' own DLA(answer - wrong) fell
    via_mlps: float  # how much every MLP's DLA(answer - wrong) fell (> 0: MLPs carried the heads' effect)
    via_other_attention: float  # the other heads' and attention biases' share of the drop
    via_embedding: float  # the embedding's share (it changes only through the final norm's scale)
    mlp_drop_per_layer: list[float]

    @staticmethod
    def measure(
        k: int,
        heads: Sequence[tuple[int, int]],
        before: Outcome,
        after: Outcome,
        controls: Sequence[Outcome],
        clean: BatchDLA,
        ablated: BatchDLA,
    ) -> Knockout:
        """Compare the knockout's outcome and DLA with the clean pass."""

        def diff(x: torch.Tensor) -> torch.Tensor:
            return x[..., ANSWER] - x[..., WRONG]

        head_drop = (diff(clean.heads) - diff(ablated.heads)).mean(dim=0)  # [L, H]
        chosen = torch.zeros_like(head_drop, dtype=torch.bool)
        for layer, head in heads:
            chosen[layer, head] = True
        mlp_drop = (diff(clean.mlp) - diff(ablated.mlp)).mean(dim=0)
        bias_drop = float((diff(clean.attn_bias) - diff(ablated.attn_bias)).mean(dim=0).sum())
        nan = float("nan")
        return Knockout(
            k=k,
            heads=[[int(layer), int(head)] for layer, head in heads],
            before=before,
            after=after,
            drop_logit_diff=before.mean_logit_diff - after.mean_logit_diff,
            drop_accuracy=before.accuracy - after.accuracy,
            random_drop_logit_diff=sum(before.mean_logit_diff - c.mean_logit_diff for c in controls) / len(controls)
            if controls
            else nan,
            random_drop_accuracy=sum(before.accuracy - c.accuracy for c in controls) / len(controls)
            if controls
            else nan,
            random_draws=len(controls),
            direct_drop=float(head_drop[chosen].sum()),
            via_mlps=float(mlp_drop.sum()),
            via_other_attention=float(head_drop[~chosen].sum()) + bias_drop,
            via_embedding=float((diff(clean.embed) - diff(ablated.embed)).mean()),
            mlp_drop_per_layer=[float(x) for x in mlp_drop],
        )


@dataclass(frozen=True)
class BranchAblation:
    """Removing the last layer's ``target`` (attn, mlp or attn+mlp) by ``mode`` (zero or mean)."""

    target: str
    mode: str
    before: Outcome
    after: Outcome
    accuracy_change: float
    prob_change: float

    @staticmethod
    def measure(target: str, mode: str, before: Outcome, after: Outcome) -> BranchAblation:
        return BranchAblation(
            target, mode, before, after, after.accuracy - before.accuracy, after.mean_prob - before.mean_prob
        )


@dataclass(frozen=True)
class FinalLayerEffect:
    """The last layer's direct effect on the answer (mean DLA over prompts) and its ablations.

    ``*_centred`` is the DLA onto the answer minus the DLA onto the mean unembedding row: a shift of
    every logit alike (which softmax ignores) does not count there."""

    layer: int
    attn_dla: float
    mlp_dla: float
    attn_dla_centred: float
    mlp_dla_centred: float
    attn_dla_diff: float
    mlp_dla_diff: float
    share_suppressed: float  # share of prompts where the last layer's centred DLA on the answer is < 0
    mean_answer_logit_centred: float  # the answer's logit minus the mean logit's DLA total, for scale
    ablations: tuple[BranchAblation, ...]

    @staticmethod
    def measure(clean: BatchDLA, ablations: tuple[BranchAblation, ...]) -> FinalLayerEffect:
        last = clean.mlp.shape[1] - 1
        attn = clean.heads[:, last].sum(dim=1) + clean.attn_bias[:, last]  # [n, 3]
        mlp = clean.mlp[:, last]
        centred = (attn + mlp)[:, ANSWER] - (attn + mlp)[:, VOCAB_MEAN]
        total = clean.total()
        return FinalLayerEffect(
            layer=last,
            attn_dla=_mean(attn[:, ANSWER]),
            mlp_dla=_mean(mlp[:, ANSWER]),
            attn_dla_centred=_mean(attn[:, ANSWER] - attn[:, VOCAB_MEAN]),
            mlp_dla_centred=_mean(mlp[:, ANSWER] - mlp[:, VOCAB_MEAN]),
            attn_dla_diff=_mean(attn[:, ANSWER] - attn[:, WRONG]),
            mlp_dla_diff=_mean(mlp[:, ANSWER] - mlp[:, WRONG]),
            share_suppressed=_mean((centred < 0).float()),
            mean_answer_logit_centred=_mean(total[:, ANSWER] - total[:, VOCAB_MEAN]),
            ablations=ablations,
        )

    def ablation(self, target: str, mode: str) -> BranchAblation | None:
        return next((a for a in self.ablations if a.target == target and a.mode == mode), None)


@dataclass(frozen=True)
class Finding:
    """One of the paper's findings on this model: whether it holds, and the numbers that decide it."""

    name: str
    holds: bool | None  # None: not measurable here (e.g. no prompt names its subject)
    evidence: str


FindingsJudge = Callable[["RecallResult"], list[Finding]]


@dataclass(frozen=True)
class RecallResult(AnalysisResult):
    """Per-head and per-layer DLA, mover-head candidates, knockouts, final-layer effect, findings."""

    json_file: ClassVar[str] = "recall.json"

    model: str
    family: str
    num_layers: int
    num_heads: int
    num_prompts: int
    templates: list[str]
    prompts_with_subject: int
    clean: Outcome
    dla_sum_max_error: float  # max over prompts |sum of parts - the model's logit| (after any softcap)
    dla_target: str
    embed_dla: float
    constant_dla: float
    head_dla: list[list[float]]  # [layer][head], onto the answer
    head_dla_diff: list[list[float]]  # [layer][head], onto answer - wrong
    subject_attention: list[list[float]]  # [layer][head]
    attn_bias_dla: list[float]
    mlp_dla: list[float]
    mlp_dla_diff: list[float]
    candidates: list[HeadCandidate]
    knockouts: list[Knockout]
    final_layer: FinalLayerEffect
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def build(
        lm: LanguageModel,
        prompts: Sequence[RecallPrompt],
        encoded: Sequence[EncodedPrompt],
        clean: BatchDLA,
        attention: torch.Tensor,
        candidates: list[HeadCandidate],
        knockouts: list[Knockout],
        final: FinalLayerEffect,
        judge: FindingsJudge,
    ) -> RecallResult:
        """Assemble the result from the measurements, then let ``judge`` add the findings."""
        error = (softcap(lm, clean.total()[:, :2]) - clean.logit).abs()
        capped = bool(getattr(lm.model.config, "final_logit_softcapping", None))
        notes = [
            "DLA: final norm (and Gemma's post-branch norms) frozen at their scale on the actual input; "
            "parts = embedding, each head, each attention bias, each MLP, and the norm/unembedding biases.",
            "mean ablation: means over the prompts at each position counted from the last token.",
        ]
        if lm.arch.parallel_residual:
            notes.append("parallel residual: a head's 'next MLP' is the next layer's (the same layer's reads h).")
        result = RecallResult(
            model=lm.name,
            family=lm.arch.family,
            num_layers=lm.num_layers,
            num_heads=num_heads(lm),
            num_prompts=len(prompts),
            templates=sorted({p.template or "file" for p in prompts}),
            prompts_with_subject=sum(1 for e in encoded if e.subject_positions),
            clean=Outcome(
                accuracy=_mean(clean.correct.float()),
                mean_prob=_mean(clean.prob),
                mean_logit_diff=_mean(clean.logit[:, 0] - clean.logit[:, 1]),
            ),
            dla_sum_max_error=float(error.max()),
            dla_target="logit before softcapping (checked after the cap)" if capped else "logit",
            embed_dla=_mean(clean.embed[:, ANSWER]),
            constant_dla=_mean(clean.constant[:, ANSWER]),
            head_dla=clean.heads[..., ANSWER].mean(dim=0).tolist(),
            head_dla_diff=(clean.heads[..., ANSWER] - clean.heads[..., WRONG]).mean(dim=0).tolist(),
            subject_attention=torch.nan_to_num(torch.nanmean(attention, dim=0), nan=float("nan")).tolist(),
            attn_bias_dla=clean.attn_bias[..., ANSWER].mean(dim=0).tolist(),
            mlp_dla=clean.mlp[..., ANSWER].mean(dim=0).tolist(),
            mlp_dla_diff=(clean.mlp[..., ANSWER] - clean.mlp[..., WRONG]).mean(dim=0).tolist(),
            candidates=candidates,
            knockouts=knockouts,
            final_layer=final,
            notes=notes,
        )
        return RecallResult(**{**result.__dict__, "findings": judge(result)})

    # -- summary ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Headline numbers: recall, the DLA check, the top mover head, the largest knockout, the last layer."""
        top = self.candidates[0] if self.candidates else None
        biggest = self.knockouts[-1] if self.knockouts else None
        both_mean = self.final_layer.ablation("attn+mlp", "mean")
        return {
            "accuracy": self.clean.accuracy,
            "mean_answer_prob": self.clean.mean_prob,
            "mean_logit_diff": self.clean.mean_logit_diff,
            "dla_sum_max_error": self.dla_sum_max_error,
            "top_mover_head": f"L{top.layer}H{top.head}" if top else None,
            "top_mover_subject_attention": top.subject_attention if top else None,
            "top_mover_dla_diff": top.dla_diff if top else None,
            "knockout_k": biggest.k if biggest else None,
            "knockout_drop_logit_diff": biggest.drop_logit_diff if biggest else None,
            "knockout_random_drop_logit_diff": biggest.random_drop_logit_diff if biggest else None,
            "knockout_via_mlps": biggest.via_mlps if biggest else None,
            "final_layer_dla_centred": self.final_layer.attn_dla_centred + self.final_layer.mlp_dla_centred,
            "final_layer_mean_ablation_prob_change": both_mean.prob_change if both_mean else None,
            "final_layer_mean_ablation_accuracy_change": both_mean.accuracy_change if both_mean else None,
            **{f"finding_{f.name}": f.holds for f in self.findings},
        }

    # -- figures -----------------------------------------------------------------------------------
    @figure("recall_dla.png")
    def _dla_figure(self, plt: Any) -> Figure:
        import numpy as np

        heads = np.array(self.head_dla_diff, dtype=float)
        bound = float(np.nanmax(np.abs(heads))) or 1.0
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
        image = ax1.imshow(heads.T, origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        fig.colorbar(image, ax=ax1, label="DLA onto logit(answer) - logit(wrong)")
        ax1.set_xlabel("layer")
        ax1.set_ylabel("head")
        ax1.set_title("heads' direct effect (last position)", fontsize=10)
        layers = np.arange(self.num_layers)
        attn = heads.sum(axis=1)
        ax2.bar(layers - 0.2, attn, width=0.4, label="attention (all heads)")
        ax2.bar(layers + 0.2, self.mlp_dla_diff, width=0.4, label="MLP")
        ax2.axhline(0, color="k", lw=0.6)
        ax2.set_xlabel("layer")
        ax2.set_ylabel("DLA onto answer - wrong")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        fig.suptitle(f"{self.model}: direct logit attribution, {self.num_prompts} prompts", fontsize=10)
        return fig

    @figure("recall_movers.png")
    def _movers_figure(self, plt: Any) -> Figure:
        import numpy as np

        attention = np.array(self.subject_attention, dtype=float).flatten()
        dla = np.array(self.head_dla_diff, dtype=float).flatten()
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.scatter(attention, dla, s=8, alpha=0.5, color="C0")
        for c in self.candidates[:10]:
            ax.annotate(f"L{c.layer}H{c.head}", (c.subject_attention, c.dla_diff), fontsize=7, color="C3")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("attention from the last position to the subject")
        ax.set_ylabel("DLA onto answer - wrong")
        ax.set_title(f"{self.model}: mover-head candidates", fontsize=10)
        ax.grid(alpha=0.3)
        return fig

    @figure("recall_ablations.png")
    def _ablations_figure(self, plt: Any) -> Figure | None:
        if not self.knockouts:
            return None
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
        ks = [str(k.k) for k in self.knockouts]
        x = list(range(len(ks)))
        ax1.bar([i - 0.2 for i in x], [k.drop_logit_diff for k in self.knockouts], width=0.4, label="top-k movers")
        ax1.bar([i + 0.2 for i in x], [k.random_drop_logit_diff for k in self.knockouts], width=0.4, label="random k")
        ax1.set_xticks(x, ks)
        ax1.set_xlabel("heads mean-ablated (k)")
        ax1.set_ylabel("drop of mean logit difference")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        labels = [f"{a.target}\n{a.mode}" for a in self.final_layer.ablations]
        y = list(range(len(labels)))
        ax2.bar(
            [i - 0.2 for i in y], [a.accuracy_change for a in self.final_layer.ablations], width=0.4, label="accuracy"
        )
        ax2.bar([i + 0.2 for i in y], [a.prob_change for a in self.final_layer.ablations], width=0.4, label="p(answer)")
        ax2.set_xticks(y, labels, fontsize=8)
        ax2.axhline(0, color="k", lw=0.6)
        ax2.set_ylabel("change when the last layer's branch is removed")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        fig.suptitle(f"{self.model}: knockouts and final-layer ablations", fontsize=10)
        return fig
