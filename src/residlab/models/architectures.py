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
``i``. That is Hugging Face ``hidden_states[i + 1]`` for every block but the last: HF's last entry is
taken after the final norm (residlab's ``final_norm`` recording site).

A model whose ``model_type`` has no table gets a map guessed from the usual module names
(:func:`guess_architecture`: the block list ``*.layers`` / ``*.h``, then the parts by their common
names), with a :class:`GuessedArchitectureWarning` and ``arch.guessed``; a part it cannot find is left
empty, and using it is a clear error. The tables stay the checked path.
"""

from __future__ import annotations

import warnings
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
    attn_out: str = ""  # attention's output projection: its *input* is the heads' outputs, concatenated
    mlp_in: str = ""  # the projection whose output is the MLP's pre-activation (the gate of a gated MLP)
    mlp_act_fn: str = ""  # the MLP's activation-function module (applied to ``mlp_in``'s output)
    mlp_up: str | None = None  # a gated MLP's up projection (multiplied by the activated gate); None if not gated
    post_attn_norm: str | None = None  # normalises attention's output before the residual add (Gemma 2/3)
    post_mlp_norm: str | None = None  # normalises the MLP's output before the residual add (Gemma 2/3)
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-NeoX, GPT-J)
    guessed: bool = False  # found by guess_architecture from module names, not declared in a table

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
    attn_out="self_attn.o_proj",
    mlp_in="mlp.gate_proj",
    mlp_act_fn="mlp.act_fn",
    mlp_up="mlp.up_proj",
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
        attn_out="attn.c_proj",
        mlp_in="mlp.c_fc",
        mlp_act_fn="mlp.act",
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
        attn_out="attention.dense",
        mlp_in="mlp.dense_h_to_4h",
        mlp_act_fn="mlp.act",
        input_norm="input_layernorm",
        pre_mlp_norm="post_attention_layernorm",  # the MLP's input norm (of h itself with a parallel residual)
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        parallel_residual=True,
    ),
}
ARCHITECTURES["gemma3"] = ARCHITECTURES["gemma3_text"]


class GuessedArchitectureWarning(UserWarning):
    """A model's architecture map was guessed from its module names, not read from a table."""


def architecture_for(model: torch.nn.Module) -> ArchitectureMap:
    """Return the map for ``model`` (by ``config.model_type``); for a family without a table, a map
    guessed from its module names (with a warning), or a clear error naming what to add."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        guessed = guess_architecture(model)
        if guessed is None:
            raise UnknownArchitectureError(
                f"residlab has no architecture map for model_type={model_type!r} ({type(model).__name__}), "
                "and found no decoder-block list (a ModuleList named layers or h) to guess one from.",
                hint=(
                    "add an ArchitectureMap entry for it in residlab/models/architectures.py: the dotted paths "
                    "of its decoder stack, block list, attention, MLP, MLP down-projection, norms (by role), "
                    f"final norm and unembedding. Known families: {', '.join(sorted(ARCHITECTURES))}."
                ),
            )
        warnings.warn(_guess_report(guessed), GuessedArchitectureWarning, stacklevel=3)
        return guessed
    if model_type == "gpt_neox" and not getattr(config, "use_parallel_residual", True):
        return replace(arch, parallel_residual=False)
    return arch


# Common module names, most usual first; a guessed map takes the first one a model has.
_BLOCK_LISTS = ("layers", "h", "blocks")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")
_MLP_DOWN = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out")
_ATTN_OUT = ("o_proj", "c_proj", "dense", "out_proj", "wo")
_MLP_IN = ("gate_proj", "c_fc", "fc1", "dense_h_to_4h", "w1", "fc_in")
_MLP_ACT_FN = ("act_fn", "act", "activation_fn", "activation")
_MLP_UP = ("up_proj", "w3")
_INPUT_NORM = ("input_layernorm", "ln_1", "attention_norm", "norm1", "ln1")
_PRE_MLP_NORM = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm", "norm2", "ln2")
_FINAL_NORM = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
_UNEMBED = ("lm_head", "embed_out", "output")


def _find(root: torch.nn.Module, names: tuple[str, ...], prefix: str = "") -> str:
    """``prefix + name`` of the first of ``names`` that is a module under ``root``, else ``""``."""
    for name in names:
        if isinstance(getattr(root, name, None), torch.nn.Module):
            return prefix + name
    return ""


def _block_list(model: torch.nn.Module) -> str | None:
    """The dotted path of the longest ModuleList named like a decoder-block list (``*.layers``, ``*.h``)."""
    found = [
        (len(module), -name.count("."), name)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        and len(module)
        and "." in name
        and name.rsplit(".", 1)[1] in _BLOCK_LISTS
    ]
    return max(found)[2] if found else None


def guess_architecture(model: torch.nn.Module) -> ArchitectureMap | None:
    """A map from the usual module names, or ``None`` when no decoder-block list is found.

    The decoder is the block list's parent; a block's parts and the norms are found by their common
    names (``self_attn``/``attn``, ``mlp``, ``down_proj``/``c_proj``/``fc2``, ``input_layernorm``/
    ``ln_1``...). A block with a single norm (Phi) is taken as a parallel-residual block whose MLP
    reads that norm's output, as is one whose config says ``use_parallel_residual``/``parallel_attn``.
    """
    blocks = _block_list(model)
    if blocks is None:
        return None
    decoder = blocks.rsplit(".", 1)[0]
    block = get_module(model, blocks)[0]  # type: ignore[index]
    mlp = _find(block, _MLP)
    attn = _find(block, _ATTN)
    mlp_module = get_module(block, mlp) if mlp else None
    input_norm = _find(block, _INPUT_NORM)
    pre_mlp_norm = _find(block, _PRE_MLP_NORM)
    sandwich = pre_mlp_norm == "pre_feedforward_layernorm"  # Gemma-style: the other two are post-norms
    config = getattr(model, "config", None)
    parallel = bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False))
    return ArchitectureMap(
        family=str(getattr(config, "model_type", None) or type(model).__name__),
        decoder=decoder,
        blocks=blocks,
        attn=attn,
        mlp=mlp,
        mlp_down=_find(mlp_module, _MLP_DOWN, f"{mlp}.") if mlp_module else "",
        attn_out=_find(get_module(block, attn), _ATTN_OUT, f"{attn}.") if attn else "",
        mlp_in=_find(mlp_module, _MLP_IN, f"{mlp}.") if mlp_module else "",
        mlp_act_fn=_find(mlp_module, _MLP_ACT_FN, f"{mlp}.") if mlp_module else "",
        mlp_up=(_find(mlp_module, _MLP_UP, f"{mlp}.") or None) if mlp_module else None,
        input_norm=input_norm,
        pre_mlp_norm=pre_mlp_norm or input_norm,
        final_norm=_find(get_module(model, decoder), _FINAL_NORM, f"{decoder}."),
        unembed=_find(model, _UNEMBED),
        post_attn_norm=_find(block, ("post_attention_layernorm",)) if sandwich else None,
        post_mlp_norm=_find(block, ("post_feedforward_layernorm",)) if sandwich else None,
        parallel_residual=parallel or (bool(input_norm) and not pre_mlp_norm),
        guessed=True,
    )


def _guess_report(arch: ArchitectureMap) -> str:
    parts = ", ".join(
        f"{field}={getattr(arch, field) or '(none)'}"
        for field in ("decoder", "blocks", "attn", "mlp", "mlp_down", "input_norm", "pre_mlp_norm", "final_norm")
    )
    return (
        f"residlab has no architecture map for model_type={arch.family!r}; guessed one from its module names "
        f"({parts}{', parallel residual' if arch.parallel_residual else ''}). Block-output steering and "
        "recording need only the block list; check the rest before relying on sub-block sites, or add an "
        "ArchitectureMap entry in residlab/models/architectures.py."
    )


def get_module(root: torch.nn.Module, path: str | None) -> torch.nn.Module:
    """Resolve a dotted attribute path (``model.layers``) under ``root``."""
    if not path:
        raise UnknownArchitectureError(
            f"this {type(root).__name__}'s architecture map has no path for the module asked for.",
            hint="the family lacks that part, or its guessed map did not find it: add the path to its "
            "ArchitectureMap in residlab/models/architectures.py.",
        )
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
