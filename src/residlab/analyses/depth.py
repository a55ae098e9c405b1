"""How a model uses its depth (Csordas, Manning & Potts 2025, "Do Language Models Use Their Depth Efficiently?").

Notation: ``h_l`` is the residual entering block ``l`` (site ``block_input``), ``a_l`` and ``m_l``
what attention and the MLP add to it, ``h_{l+1} = h_l + a_l + m_l`` the block output (site ``block``,
layer ``l`` in residlab's convention). Three measurements:

1. **Relative contributions** per layer, averaged over tokens: ``||a_l|| / ||h_l||``,
   ``||m_l|| / ||h_l + a_l||`` and ``||h_{l+1} - h_l|| / ||h_l||``, and the cosine of each contribution
   with the residual it is added to (negative = the block erases what is there).
   *Parallel residual* (GPT-NeoX): attention and MLP both read ``h_l`` and ``h_l + a_l`` never exists,
   so the MLP is measured against ``h_l``: ``||m_l|| / ||h_l||`` and ``cos(m_l, h_l)``.
   *Sandwich norms* (Gemma 2/3): the branch outputs are normalised again before the residual add,
   so ``a_l`` and ``m_l`` are taken after the architecture map's ``post_attn_norm`` / ``post_mlp_norm``;
   in every family ``h_{l+1} = h_l + a_l + m_l`` holds exactly.
2. **Future effect of skipping a layer**: block ``s``'s output := its input at real positions >=
   ``first_position`` (1 by default, so the first token, often an attention sink, is kept). For every
   layer ``l`` the effect is ``max over positions ||delta(h_{l+1} - h_l)|| / ||h_{l+1} - h_l||`` (the relative
   change of that block's contribution), averaged over texts; the matrix is ``[skipped s, layer l]``.
   Entries with ``l < s`` are measured too and are exactly 0 (the model is causal in depth), and
   ``l = s`` is 1 (the contribution is removed). The change in output probabilities is reported as
   the max over positions of ``||p_skipped - p||_2`` (averaged over texts) and the mean over tokens of
   ``KL(p || p_skipped)``.
3. **Logit lens**: ``KL(p_lens_l || p_final)`` per layer, where ``p_lens_l`` is final norm + unembedding of
   the block-``l`` output and ``p_final`` the model's output distribution, and the overlap of the two
   top-5 token sets (|intersection| / 5). At the last layer the lens is the output (KL 0, overlap 1).

Averages run over real tokens at positions >= ``first_position``; the next-token distribution of
every such token counts (all of them, not only the last).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.common import TokenBatch, chunks, run_decoder, token_batches, tokenize, unembed
from residlab.analyses.lens import lens_log_probs
from residlab.analyses.means import LayerMeans, halves
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.core.types import Log
from residlab.models.architectures import get_module

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel

_SITES = ("block_input", "attn", "mlp", "block")
_CHUNK = 128  # tokens per vocabulary-sized block of logits
_CONTRIBUTION_STATS = ("attn_rel", "mlp_rel", "block_rel", "attn_cos", "mlp_cos", "block_cos")


@dataclass(frozen=True)
class DepthResult(AnalysisResult):
    """Per-layer curves (index = layer) and the skip matrix ``skip_effect[s][l]``."""

    json_file: ClassVar[str] = "depth.json"

    model: str
    family: str
    num_layers: int
    num_texts: int
    num_tokens: int  # tokens averaged over (real, position >= first_position)
    first_position: int
    parallel_residual: bool
    attn_rel: list[float]
    mlp_rel: list[float]
    block_rel: list[float]
    attn_cos: list[float]
    mlp_cos: list[float]
    block_cos: list[float]
    lens_kl: list[float]
    lens_top5: list[float]
    skip_texts: int = 0
    skip_effect: list[list[float]] | None = None
    skip_output_l2: list[float] | None = None
    skip_output_kl: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    # -- derived numbers -------------------------------------------------------------------------
    def future_effect(self) -> list[float] | None:
        """Per skipped layer: mean effect on the layers after it (NaN for the last layer)."""
        if self.skip_effect is None:
            return None
        out = []
        for s, row in enumerate(self.skip_effect):
            later = row[s + 1 :]
            out.append(sum(later) / len(later) if later else float("nan"))
        return out

    def summary(self) -> dict[str, Any]:
        """Headline numbers. Half means split the layers at ``num_layers // 2`` and leave out layer 0,
        whose input is the bare token embedding (its relative contribution is huge in every model)."""
        n = self.num_layers

        def split(values: list[float] | None) -> tuple[float, float]:
            values = list(values or [])
            return halves([float("nan")] + values[1:]) if len(values) > 1 else (float("nan"), float("nan"))

        first, second = split(self.block_rel)
        drops = [self.lens_kl[i - 1] - self.lens_kl[i] for i in range(1, n)]
        peak = max(self.lens_kl) if self.lens_kl else float("nan")
        summary: dict[str, Any] = {
            "halves": f"layers 1..{n // 2 - 1} vs {n // 2}..{n - 1}",
            "block_rel_first_half": first,
            "block_rel_second_half": second,
            "block_rel_second_over_first": second / first if first else float("nan"),
            "block_cos_first_half": split(self.block_cos)[0],
            "block_cos_second_half": split(self.block_cos)[1],
            "lens_kl_steepest_drop_layer": 1 + max(range(len(drops)), key=drops.__getitem__) if drops else None,
            "lens_kl_below_half_of_peak_layer": next((i for i, v in enumerate(self.lens_kl) if v <= peak / 2), None)
            if math.isfinite(peak)
            else None,
            "lens_top5_reaches_half_layer": next((i for i, v in enumerate(self.lens_top5) if v >= 0.5), None),
        }
        future = self.future_effect()
        if future is not None:
            f1, f2 = split(future)  # the last layer has no later layer (NaN, ignored)
            summary.update(
                future_effect_first_half=f1,
                future_effect_second_half=f2,
                future_effect_second_over_first=f2 / f1 if f1 else float("nan"),
            )
            o1, o2 = split(self.skip_output_l2)
            k1, k2 = split(self.skip_output_kl)
            summary.update(
                output_l2_first_half=o1, output_l2_second_half=o2, output_kl_first_half=k1, output_kl_second_half=k2
            )
        return summary

    def derived(self) -> dict[str, Any]:
        return {"future_effect": self.future_effect()}

    # -- figures -----------------------------------------------------------------------------------
    @figure("depth_contributions.png")
    def _contributions_figure(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        mlp_label = "MLP ||m|| / ||h||" if self.parallel_residual else "MLP ||m|| / ||h+a||"
        ax1.plot(layers, self.attn_rel, "o-", ms=3, label="attention ||a|| / ||h||")
        ax1.plot(layers, self.mlp_rel, "s-", ms=3, label=mlp_label)
        ax1.plot(layers, self.block_rel, "^-", ms=3, label="block ||h_out - h|| / ||h||")
        ax1.set_yscale("log")
        ax1.set_xlabel("layer")
        ax1.set_ylabel("relative contribution (mean over tokens)")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        ax2.plot(layers, self.attn_cos, "o-", ms=3, label="cos(a, h)")
        ax2.plot(layers, self.mlp_cos, "s-", ms=3, label="cos(m, h)" if self.parallel_residual else "cos(m, h+a)")
        ax2.plot(layers, self.block_cos, "^-", ms=3, label="cos(h_out - h, h)")
        ax2.axhline(0, color="k", lw=0.6)
        ax2.set_xlabel("layer")
        ax2.set_ylabel("cosine with the residual (< 0: erasing)")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        fig.suptitle(f"{self.model}: contributions per layer ({self.num_tokens} tokens)", fontsize=10)
        return fig

    @figure("depth_logit_lens.png")
    def _logit_lens_figure(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(layers, self.lens_kl, "o-", ms=3, color="C3", label="KL(lens || final)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("layer")
        ax.set_ylabel("KL (nats)", color="C3")
        twin = ax.twinx()
        twin.plot(layers, self.lens_top5, "s-", ms=3, color="C0", label="top-5 overlap")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("top-5 overlap with the output", color="C0")
        ax.grid(alpha=0.3)
        ax.set_title(f"{self.model}: logit lens", fontsize=10)
        return fig

    @figure("depth_skip_effect.png")
    def _skip_effect_figure(self, plt: Any) -> Figure | None:
        if self.skip_effect is None:
            return None
        import numpy as np

        layers = list(range(self.num_layers))
        matrix = np.array(self.skip_effect, dtype=float)
        masked = np.ma.masked_where(np.tri(self.num_layers, dtype=bool), matrix)  # keep l > s only
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})
        image = ax1.imshow(masked, origin="lower", cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax1, label="max_pos ||delta contribution|| / ||contribution||")
        ax1.set_xlabel("later layer l")
        ax1.set_ylabel("skipped layer s")
        ax1.set_title("effect of skipping layer s on layer l", fontsize=10)
        future = self.future_effect() or []
        ax2.plot(layers, future, "o-", ms=3, label="mean effect on later layers")
        ax2.plot(layers, self.skip_output_l2, "s-", ms=3, label="output: max_pos ||delta p||_2")
        ax2.set_xlabel("skipped layer s")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        ax2.set_title(f"skip effects ({self.skip_texts} texts)", fontsize=10)
        return fig


# --------------------------------------------------------------------------------------------- maths


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=-1)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp(min=torch.finfo(num.dtype).tiny)


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)


@torch.inference_mode()
def branch_contributions(
    lm: LanguageModel, layer: int, attn: torch.Tensor, mlp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention and the MLP of ``layer`` add to the residual (float32), from the recorded module
    outputs: after the architecture's post-branch norms where it has them (sandwich norms, Gemma 2/3)."""
    block = lm.blocks[layer]
    post_attn, post_mlp = lm.arch.post_attn_norm, lm.arch.post_mlp_norm
    a = attn if post_attn is None else get_module(block, post_attn)(attn)
    m = mlp if post_mlp is None else get_module(block, post_mlp)(mlp)
    return a.float(), m.float()


@torch.inference_mode()
def _final_log_probs(lm: LanguageModel, normed_valid: torch.Tensor) -> torch.Tensor:
    parts = [torch.log_softmax(unembed(lm, normed_valid[p]), -1) for p in chunks(normed_valid.shape[0], _CHUNK)]
    # a batch with no token to measure (one-token texts) still gives a [0, vocab] tensor
    return torch.cat(parts) if parts else torch.log_softmax(unembed(lm, normed_valid), -1)


def _row_max(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[batch] max over valid positions of [batch, tokens] values (0 for a row with none)."""
    return values.masked_fill(~valid, 0.0).amax(dim=1)


# --------------------------------------------------------------------------------------------- analysis


class _DepthTotals:
    """What :func:`analyze_depth` accumulates over batches."""

    def __init__(self, n_layers: int) -> None:
        self.stats = {name: LayerMeans(n_layers) for name in _CONTRIBUTION_STATS}
        self.lens_kl, self.lens_top5 = LayerMeans(n_layers), LayerMeans(n_layers)
        self.num_tokens = 0
        self.skip_rows = 0  # texts the skip runs covered
        self.effect_sum = torch.zeros(n_layers, n_layers, dtype=torch.float64)
        self.out_l2_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.out_kl_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.out_kl_count = 0

    def skip_means(self) -> tuple[list[list[float]] | None, list[float] | None, list[float] | None]:
        """The skip matrix, the output L2 change (both averaged over texts) and the output KL (over tokens)."""
        if not self.skip_rows:
            return None, None, None
        return (
            (self.effect_sum / self.skip_rows).tolist(),
            (self.out_l2_sum / self.skip_rows).tolist(),
            (self.out_kl_sum / max(self.out_kl_count, 1)).tolist(),
        )


def _depth_batches(
    lm: LanguageModel, rows: list[list[int]], n_skip: int, batch_size: int
) -> Iterator[tuple[TokenBatch, bool]]:
    """Batches of the first ``n_skip`` texts (flagged for skip runs), then of the others."""
    for start, stop, do_skip in ((0, n_skip, True), (n_skip, len(rows), False)):
        part = rows[start:stop]
        if any(part):
            for tb in token_batches(lm, part, batch_size):
                yield TokenBatch(tuple(start + r for r in tb.rows), tb.batch), do_skip


@torch.inference_mode()
def _measure_batch(
    lm: LanguageModel, tb: TokenBatch, valid: torch.Tensor, totals: _DepthTotals
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Contributions and the logit lens of one batch; return the output log-probs of its valid tokens
    and each layer's contribution ``h_{l+1} - h_l`` (what the skip runs compare against)."""
    layers = list(range(lm.num_layers))
    n_valid = int(valid.sum())
    with lm.record(layers, positions="all", sites=_SITES) as rec:
        normed = run_decoder(lm, tb)
    final_logp = _final_log_probs(lm, normed[valid])
    final_top = final_logp.topk(5, dim=-1).indices
    stats = totals.stats
    contributions = []
    for layer in layers:
        h = rec[layer, "block_input"].float()
        out = rec[layer, "block"].float()
        a, m = branch_contributions(lm, layer, rec[layer, "attn"], rec[layer, "mlp"])
        mid = h if lm.arch.parallel_residual else h + a
        delta = out - h
        contributions.append(delta)
        hv, mv, dv, av, mmv = h[valid], mid[valid], delta[valid], a[valid], m[valid]
        stats["attn_rel"].add(layer, _ratio(_norm(av), _norm(hv)))
        stats["mlp_rel"].add(layer, _ratio(_norm(mmv), _norm(mv)))
        stats["block_rel"].add(layer, _ratio(_norm(dv), _norm(hv)))
        stats["attn_cos"].add(layer, _cos(av, hv))
        stats["mlp_cos"].add(layer, _cos(mmv, mv))
        stats["block_cos"].add(layer, _cos(dv, hv))
        states = out[valid]
        for part in chunks(n_valid, _CHUNK):
            logp = lens_log_probs(lm, states[part])
            totals.lens_kl.add(layer, (logp.exp() * (logp - final_logp[part])).sum(-1))
            top = logp.topk(5, dim=-1).indices
            overlap = (top.unsqueeze(-1) == final_top[part].unsqueeze(-2)).any(-1).sum(-1).float() / 5
            totals.lens_top5.add(layer, overlap)
    return final_logp, contributions


@torch.inference_mode()
def _measure_skips(
    lm: LanguageModel,
    tb: TokenBatch,
    valid: torch.Tensor,
    first_position: int,
    final_logp: torch.Tensor,
    contributions: list[torch.Tensor],
    totals: _DepthTotals,
    log: Log,
) -> None:
    """Skip each layer in turn on one batch; add the effects on later layers and on the output."""
    layers = list(range(lm.num_layers))
    n_valid = int(valid.sum())
    totals.skip_rows += len(tb.rows)
    final_p = final_logp.exp()
    for s in layers:
        with (
            lm.skip([s], from_position=first_position),
            lm.record(layers, "all", sites=("block_input", "block")) as rec,
        ):
            normed = run_decoder(lm, tb)
        for layer in layers:
            changed = rec[layer, "block"].float() - rec[layer, "block_input"].float()
            base = contributions[layer]
            rel = _ratio(_norm(changed - base), _norm(base))
            totals.effect_sum[s, layer] += float(_row_max(rel, valid).double().sum())
        del rec
        skipped = normed[valid]
        l2 = torch.empty(n_valid)
        for part in chunks(n_valid, _CHUNK):
            logq = torch.log_softmax(unembed(lm, skipped[part]), -1)
            l2[part] = (logq.exp() - final_p[part]).norm(dim=-1)
            totals.out_kl_sum[s] += float((final_p[part] * (final_logp[part] - logq)).sum(-1).double().sum())
        l2_grid = torch.zeros(valid.shape)
        l2_grid[valid] = l2
        totals.out_l2_sum[s] += float(_row_max(l2_grid, valid).double().sum())
        log(f"  skipped layer {s}")
    totals.out_kl_count += n_valid


@torch.inference_mode()
def analyze_depth(
    lm: LanguageModel,
    texts: Sequence[str],
    *,
    max_tokens: int | None = 128,
    batch_size: int = 8,
    first_position: int = 1,
    skip: bool = True,
    skip_texts: int | None = None,
    log: Log | None = None,
) -> DepthResult:
    """Contributions, skip effects and the logit lens of ``lm`` on ``texts`` (see the module docstring).

    ``max_tokens`` cuts each text; ``skip=False`` leaves out the skip matrix (one extra forward pass
    per layer); ``skip_texts`` computes it on the first texts only.
    """
    log = log or (lambda message: None)
    rows = tokenize(lm, texts, max_tokens)
    n_skip = 0 if not skip else len(rows) if skip_texts is None else max(0, min(skip_texts, len(rows)))
    if first_position < 0:
        raise ResidlabError(f"first_position must be >= 0, got {first_position}.", hint="pass --first-position 0 or 1.")

    totals = _DepthTotals(lm.num_layers)
    for tb, do_skip in _depth_batches(lm, rows, n_skip, batch_size):
        valid = tb.valid(first_position)
        n_valid = int(valid.sum())
        totals.num_tokens += n_valid
        log(f"batch of {len(tb.rows)} texts ({n_valid} tokens){' + skip runs' if do_skip else ''}")
        final_logp, contributions = _measure_batch(lm, tb, valid, totals)
        if do_skip:
            _measure_skips(lm, tb, valid, first_position, final_logp, contributions, totals, log)

    if totals.num_tokens == 0:
        raise ResidlabError(
            f"no token at position >= {first_position} in any text: nothing to average.",
            hint="pass longer texts (or a larger --max-tokens).",
        )
    notes = []
    if lm.arch.parallel_residual:
        notes.append("parallel residual: the MLP is measured against the block input h (h + a does not exist).")
    if lm.arch.sandwich_norms:
        notes.append("sandwich norms: attention/MLP contributions are taken after their post-norms.")
    skip_effect, skip_output_l2, skip_output_kl = totals.skip_means()
    stats = totals.stats
    return DepthResult(
        model=lm.name,
        family=lm.arch.family,
        num_layers=lm.num_layers,
        num_texts=len(rows),
        num_tokens=totals.num_tokens,
        first_position=first_position,
        parallel_residual=lm.arch.parallel_residual,
        attn_rel=stats["attn_rel"].means(),
        mlp_rel=stats["mlp_rel"].means(),
        block_rel=stats["block_rel"].means(),
        attn_cos=stats["attn_cos"].means(),
        mlp_cos=stats["mlp_cos"].means(),
        block_cos=stats["block_cos"].means(),
        lens_kl=totals.lens_kl.means(),
        lens_top5=totals.lens_top5.means(),
        skip_texts=totals.skip_rows,
        skip_effect=skip_effect,
        skip_output_l2=skip_output_l2,
        skip_output_kl=skip_output_kl,
        notes=notes,
    )
