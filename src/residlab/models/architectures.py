"""Declarative per-architecture module maps: a new family is one small table, not new logic.

Every path is a dotted attribute path. ``decoder``, ``blocks``, ``final_norm`` and ``unembed`` are
relative to the top-level causal-LM module; ``attn``, ``mlp``, ``mlp_down`` and the norms are relative
to one decoder block. ``mlp_down`` is the MLP's output projection: its *input* is the MLP's hidden
activation (after the nonlinearity and gating), which sparsity analyses read.

Norms are named by role, not by module name, because the names mislead: Llama's
``post_attention_layernorm`` is the norm *before the MLP* (``pre_mlp_norm``), while Gemma 3's
``post_attention_layernorm`` normalises attention's output before the residual add
(``post_attn_norm``). A pre-norm block computes::

    h = h + post_attn_norm(attn(input_norm(h)))       # post_attn_norm: identity where None
    h = h + post_mlp_norm(mlp(pre_mlp_norm(h)))       # post_mlp_norm: identity where None

(with a parallel residual, both branches read the block's input ``h``).

Layer convention used everywhere in residlab: layer ``i`` (0-based) is the output of decoder block
``i``, i.e. Hugging Face ``hidden_states[i + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from residlab.core.errors import UnknownArchitectureError


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the residual-stream parts of one model family live."""

    family: str
    decoder: str  # the stack of blocks (receives attention_mask / position_ids / cache)
    blocks: str  # the ModuleList of decoder blocks
    attn: str
    mlp: str
    mlp_down: str
    input_norm: str  # normalises the residual before attention
    pre_mlp_norm: str  # normalises the residual before the MLP
    final_norm: str
    unembed: str
    post_attn_norm: str | None = None  # normalises attention's output before the residual add (Gemma 2/3)
    post_mlp_norm: str | None = None  # normalises the MLP's output before the residual add (Gemma 2/3)
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-NeoX, GPT-J)

    @property
    def sandwich_norms(self) -> bool:
        """Whether a branch's output is normalised again before it is added to the residual."""
        return self.post_attn_norm is not None or self.post_mlp_norm is not None


_LLAMA_LIKE: dict[str, Any] = dict(
    decoder="model",
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    input_norm="input_layernorm",
    pre_mlp_norm="post_attention_layernorm",  # the name says "post attention": it normalises the MLP's input
    final_norm="model.norm",
    unembed="lm_head",
)

ARCHITECTURES: dict[str, ArchitectureMap] = {
    "llama": ArchitectureMap(family="llama", **_LLAMA_LIKE),
    "mistral": ArchitectureMap(family="mistral", **_LLAMA_LIKE),
    "qwen2": ArchitectureMap(family="qwen2", **_LLAMA_LIKE),
    "qwen3": ArchitectureMap(family="qwen3", **_LLAMA_LIKE),
    "gemma3_text": ArchitectureMap(
        family="gemma3_text",
        **{
            **_LLAMA_LIKE,
            "post_attn_norm": "post_attention_layernorm",  # here the name is right: attention's output
            "pre_mlp_norm": "pre_feedforward_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm",
        },
    ),
    "gpt2": ArchitectureMap(
        family="gpt2",
        decoder="transformer",
        blocks="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        input_norm="ln_1",
        pre_mlp_norm="ln_2",
        final_norm="transformer.ln_f",
        unembed="lm_head",
    ),
    "gpt_neox": ArchitectureMap(
        family="gpt_neox",
        decoder="gpt_neox",
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        input_norm="input_layernorm",
        pre_mlp_norm="post_attention_layernorm",  # the MLP's input norm (of h itself with a parallel residual)
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        parallel_residual=True,
    ),
}
ARCHITECTURES["gemma3"] = ARCHITECTURES["gemma3_text"]


def architecture_for(model: torch.nn.Module) -> ArchitectureMap:
    """Return the map for ``model`` (by ``config.model_type``), or a clear error naming what to add."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise UnknownArchitectureError(
            f"residlab has no architecture map for model_type={model_type!r} ({type(model).__name__}).",
            hint=(
                "add an ArchitectureMap entry for it in residlab/models/architectures.py: the dotted paths "
                "of its decoder stack, block list, attention, MLP, MLP down-projection, norms (by role), "
                f"final norm and unembedding. Known families: {', '.join(sorted(ARCHITECTURES))}."
            ),
        )
    if model_type == "gpt_neox" and not getattr(model.config, "use_parallel_residual", True):
        return replace(arch, parallel_residual=False)
    return arch


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Resolve a dotted attribute path (``model.layers``) under ``root``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
