"""Declarative per-architecture module maps: a new family is one small table, not new logic.

Every path is a dotted attribute path. ``decoder`` and ``blocks``, ``final_norm``, ``embed`` and
``unembed`` are relative to the top-level causal-LM module; ``attn``, ``mlp``, ``mlp_down`` and the
norms are relative to one decoder block. ``mlp_down`` is the MLP's output projection: its *input*
is the MLP's hidden activation (after the nonlinearity and gating), which sparsity analyses read.

Layer convention used everywhere in residlab: layer ``i`` (0-based) is the output of decoder block
``i``, i.e. Hugging Face ``hidden_states[i + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    block_norms: tuple[str, ...]
    final_norm: str
    embed: str
    unembed: str
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-NeoX, GPT-J)


_LLAMA_LIKE = dict(
    decoder="model",
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    block_norms=("input_layernorm", "post_attention_layernorm"),
    final_norm="model.norm",
    embed="model.embed_tokens",
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
            "block_norms": (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ),
        },
    ),
    "gpt2": ArchitectureMap(
        family="gpt2",
        decoder="transformer",
        blocks="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        block_norms=("ln_1", "ln_2"),
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        unembed="lm_head",
    ),
    "gpt_neox": ArchitectureMap(
        family="gpt_neox",
        decoder="gpt_neox",
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        block_norms=("input_layernorm", "post_attention_layernorm"),
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
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
                "of its decoder stack, block list, attention, MLP, MLP down-projection, norms, final norm, "
                f"embedding and unembedding. Known families: {', '.join(sorted(ARCHITECTURES))}."
            ),
        )
    if model_type == "gpt_neox" and not getattr(model.config, "use_parallel_residual", True):
        return ArchitectureMap(**{**arch.__dict__, "parallel_residual": False})
    return arch


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Resolve a dotted attribute path (``model.layers``) under ``root``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
