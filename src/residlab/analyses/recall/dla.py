"""Direct logit attribution (DLA) at the last position, split so that the parts add up to the logit.

The residual stream entering the final norm is ``r = e + sum_l (a_l + m_l)``: the embedding ``e``
(block 0's input, position embeddings included), and what attention and the MLP of each layer add
(after their post-norms in Gemma's sandwich layout). Attention's output is its output projection of
the concatenated heads, ``a_l = sum_h W_O[:, h] z_h + b_O``, so each head owns ``W_O[:, h] z_h`` and the
bias is a part of its own. With the final norm's scale frozen at its value on ``r`` (see
:mod:`~residlab.analyses.recall.norms`) the logit of token ``t`` is exactly

    logit_t = sum over parts c of  v_t . c   +   (norm bias . W_U[t] + unembedding bias_t)

with ``v_t`` the unembedding row read back through the frozen norm. A Gemma post-attention norm is
frozen the same way at attention's actual output, which keeps the per-head split exact: each head's
share is its output times the frozen scale and gain. Where the model soft-caps its logits, the parts
add up to the logit before the cap. The attribution is read for three directions: the answer's first
token, the wrong answer's, and the mean of all unembedding rows (to tell a shift of every logit
from one aimed at the answer).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from residlab.analyses.recall.encoding import RecallBatch
from residlab.analyses.recall.norms import freeze_norm
from residlab.interventions.record import Recording

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

ANSWER, WRONG, VOCAB_MEAN = 0, 1, 2  # the directions' index in every DLA tensor's last axis


@dataclass(frozen=True)
class BatchDLA:
    """Per prompt (rows): DLA parts on the three directions (last axis), and what the model output."""

    embed: torch.Tensor  # [n, 3]
    heads: torch.Tensor  # [n, layers, heads, 3]
    attn_bias: torch.Tensor  # [n, layers, 3]
    mlp: torch.Tensor  # [n, layers, 3]
    constant: torch.Tensor  # [n, 3]: the final norm's bias and the unembedding's bias
    logit: torch.Tensor  # [n, 2]: the model's own logits of the answer and the wrong answer
    prob: torch.Tensor  # [n]: the answer's probability
    correct: torch.Tensor  # [n] bool: the answer is the top-1 token
    mlp_along_head: torch.Tensor  # [n, layers, heads]: <next MLP's output, head output> / ||head output||^2

    def total(self) -> torch.Tensor:
        """[n, 3]: the sum of every part (before any softcapping)."""
        return self.embed + self.heads.sum(dim=(1, 2)) + self.attn_bias.sum(dim=1) + self.mlp.sum(dim=1) + self.constant

    @staticmethod
    def cat(parts: list[BatchDLA]) -> BatchDLA:
        """Rows of several batches, in order."""
        return BatchDLA(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(BatchDLA)})


def branch_site(lm: LanguageModel, branch: str) -> str:
    """The recording site of ``branch`` (``attn`` / ``mlp``) as it is added to the residual stream."""
    post = lm.arch.post_attn_norm if branch == "attn" else lm.arch.post_mlp_norm
    return branch if post is None else f"post_{branch}_norm"


def dla_recording(lm: LanguageModel) -> Recording:
    """What :func:`measure_dla` reads, at the last position of every layer."""
    return lm.record(range(lm.num_layers), "last", ("block_input", "attn_heads", branch_site(lm, "mlp"), "block"))


def output_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as float32 [out, in] (``nn.Linear`` or GPT-2's ``Conv1D``) and its bias."""
    weight = torch.as_tensor(module.weight).detach().float()
    if not isinstance(module, torch.nn.Linear):
        weight = weight.T  # transformers' Conv1D stores [in, out]
    bias = getattr(module, "bias", None)
    return weight, None if bias is None else bias.detach().float()


def num_heads(lm: LanguageModel) -> int:
    return int(lm.model.config.num_attention_heads)  # type: ignore[union-attr, arg-type]


def last_logits(lm: LanguageModel, rb: RecallBatch) -> torch.Tensor:
    """Run a batch (no cache) and return the last position's logits, float32 [n, vocab]."""
    batch = rb.batch
    kwargs = {}
    if "logits_to_keep" in inspect.signature(type(lm.model).forward).parameters:
        kwargs["logits_to_keep"] = 1
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions,
            use_cache=False,
            **kwargs,
        )
    return out.logits[:, -1, :].float()


def _head_parts(lm: LanguageModel, rec: Recording, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each head's share of attention's contribution at ``layer`` as added ([n, heads, d]) and the
    bias's share ([n, d] or None), post-attention norm (frozen) applied."""
    z = rec[layer, "attn_heads"].float()
    weight, bias = output_weight(lm.block_part(layer, "attn_out"))
    n, width = z.shape
    heads = num_heads(lm)
    per_head = torch.einsum("nhk,dhk->nhd", z.view(n, heads, width // heads), weight.view(-1, heads, width // heads))
    bias_part = None if bias is None else bias.expand(n, -1)
    if lm.arch.post_attn_norm is not None:
        raw = per_head.sum(dim=1) + (0 if bias_part is None else bias_part)
        frozen = freeze_norm(lm.block_part(layer, "post_attn_norm"), raw)
        per_head = frozen.linear(per_head)
        bias_part = None if bias_part is None else frozen.linear(bias_part)
    return per_head, bias_part


def _directions(lm: LanguageModel, rb: RecallBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Unembedding rows [n, 3, d] of the answer, the wrong answer and the vocabulary mean, and the
    unembedding's bias for them [n, 3] (zeros without one)."""
    weight, bias = output_weight(lm.model_part("unembed"))
    ids = torch.stack([rb.answer_ids, rb.wrong_ids], dim=1)
    rows = torch.cat([weight[ids], weight.mean(dim=0).expand(ids.shape[0], 1, -1)], dim=1)
    if bias is None:
        return rows, torch.zeros(ids.shape[0], 3, device=rows.device)
    return rows, torch.cat([bias[ids], bias.mean().expand(ids.shape[0], 1)], dim=1)


def measure_dla(lm: LanguageModel, rb: RecallBatch, rec: Recording, logits: torch.Tensor) -> BatchDLA:
    """The DLA of every part for one batch, from a pass recorded with :func:`dla_recording`."""
    layers = lm.num_layers
    mlp_site = branch_site(lm, "mlp")
    final = freeze_norm(lm.model_part("final_norm"), rec[layers - 1, "block"])
    rows, unembed_bias = _directions(lm, rb)
    read = final.readout(rows)  # [n, 3, d]
    constant = unembed_bias + (0 if final.bias is None else rows @ final.bias)
    heads, attn_bias, mlp, along = [], [], [], []
    mlp_out = [rec[layer, mlp_site].float() for layer in range(layers)]
    for layer in range(layers):
        per_head, bias_part = _head_parts(lm, rec, layer)
        heads.append(torch.einsum("nhd,nkd->nhk", per_head, read))
        attn_bias.append(
            torch.zeros_like(constant) if bias_part is None else torch.einsum("nd,nkd->nk", bias_part, read)
        )
        mlp.append(torch.einsum("nd,nkd->nk", mlp_out[layer], read))
        reader = layer + 1 if lm.arch.parallel_residual else layer  # the first MLP that reads this head
        if reader < layers:
            dot = torch.einsum("nhd,nd->nh", per_head, mlp_out[reader])
            along.append(dot / per_head.pow(2).sum(dim=-1).clamp(min=1e-12))
        else:
            along.append(torch.full(per_head.shape[:2], float("nan"), device=per_head.device))
    logp = torch.log_softmax(logits, dim=-1)
    ids = torch.stack([rb.answer_ids, rb.wrong_ids], dim=1)
    return BatchDLA(
        embed=torch.einsum("nd,nkd->nk", rec[0, "block_input"].float(), read).cpu(),
        heads=torch.stack(heads, dim=1).cpu(),
        attn_bias=torch.stack(attn_bias, dim=1).cpu(),
        mlp=torch.stack(mlp, dim=1).cpu(),
        constant=constant.cpu(),
        logit=logits.gather(1, ids).cpu(),
        prob=logp.gather(1, rb.answer_ids.unsqueeze(1)).squeeze(1).exp().cpu(),
        correct=(logits.argmax(dim=-1) == rb.answer_ids).cpu(),
        mlp_along_head=torch.stack(along, dim=1).cpu(),
    )


def softcap(lm: LanguageModel, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit soft-capping applied to ``logits`` (identity where it has none)."""
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
