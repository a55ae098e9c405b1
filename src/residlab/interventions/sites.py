"""Where in a model an intervention reads or writes: named sites, resolved through the architecture map.

A block site is a module of decoder block ``i`` (by its :class:`~residlab.models.architectures.ArchitectureMap`
field, ``""`` = the block itself) and whether its *input* or its *output* is the value. For a pre-norm
block (see the architecture map)::

    block_input ─┬─ input_norm ─ attn ─ [post_attn_norm] ─┐
                 └───────────────────────────────────────(+)─┬─ pre_mlp_norm ─ mlp ─ [post_mlp_norm] ─┐
                                                             └──────────────────────────────────────(+)─ block

``mlp_act`` is the MLP's hidden activation (the input of its down-projection), ``mlp_pre`` its
pre-activation (the output of the gate / first projection), ``attn_heads`` the per-head outputs that
attention's output projection reads (n_heads x head_dim, concatenated). The post-norm sites exist
only in families that normalise a branch's output again (Gemma 2/3). Every site but those three has the
residual's width, so a steering vector can be added there.

A model site is one module of the whole model: ``final_norm``, the last block's output after the final
norm, which is Hugging Face's last ``hidden_states`` entry (``lm.record(layers=["final_norm"])``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from residlab.core.errors import ResidlabError


class Site(NamedTuple):
    """A module (architecture-map field; ``""`` = the block) and which side of it is the value.

    A tuple, so ``part, reads = SITES[name]`` keeps working for code written against the older tables."""

    part: str
    reads: Literal["input", "output"]


SITES: dict[str, Site] = {
    "block": Site("", "output"),  # the residual stream after block i: the layer-i convention
    "block_input": Site("", "input"),  # the residual stream before block i
    "attn": Site("attn", "output"),  # attention's contribution (before any post-norm of its own)
    "mlp": Site("mlp", "output"),  # the MLP's contribution (before any post-norm of its own)
    "mlp_act": Site("mlp_down", "input"),  # the MLP's hidden activation
    "mlp_pre": Site("mlp_in", "output"),  # the MLP's pre-activation (the gate's, in a gated MLP)
    "attn_heads": Site("attn_out", "input"),  # the heads' outputs, concatenated (n_heads x head_dim)
    "input_norm": Site("input_norm", "output"),  # the normalised residual that attention reads
    "pre_mlp_norm": Site("pre_mlp_norm", "output"),  # the normalised residual that the MLP reads
    "post_attn_norm": Site("post_attn_norm", "output"),  # attention's output as added (Gemma 2/3)
    "post_mlp_norm": Site("post_mlp_norm", "output"),  # the MLP's output as added (Gemma 2/3)
}
# Sites whose width is not the residual's (the MLP's hidden width, or n_heads x head_dim): no steering vector fits.
MLP_WIDTH_SITES = frozenset({"mlp_act", "mlp_pre", "attn_heads"})

MODEL_SITES: dict[str, Site] = {
    "final_norm": Site("final_norm", "output"),  # the last block's output, final norm applied
}


def block_site(name: str, *, purpose: str = "recording", residual_only: bool = False) -> Site:
    """The block site called ``name``, or a clear error listing the ones there are."""
    site = SITES.get(name)
    allowed = ", ".join(n for n in SITES if n not in MLP_WIDTH_SITES or not residual_only)
    if site is None:
        raise ResidlabError(f"unknown {purpose} site {name!r}.", hint=f"use one of {allowed}.")
    if residual_only and name in MLP_WIDTH_SITES:
        raise ResidlabError(
            f"no {purpose} at site {name!r}: it has the MLP's hidden width, not the residual's.",
            hint=f"use one of {allowed}.",
        )
    return site


def model_site(name: str) -> Site:
    """The model-level site called ``name`` (a named pseudo-layer such as ``final_norm``)."""
    site = MODEL_SITES.get(name)
    if site is None:
        raise ResidlabError(
            f"unknown layer {name!r}.",
            hint=f"layers are block numbers (0-based, negative from the end) or one of {', '.join(MODEL_SITES)}.",
        )
    return site
