"""What patching patches: component families, and the sites of each (a window of layers x one unit).

A family reads one intervention site (:mod:`residlab.interventions.sites`) at every layer and splits
it into units:

====================  =====================  =====================================================
family                intervention site      unit
====================  =====================  =====================================================
``resid``             ``block`` (output)     a position: the residual stream after block ``layer``
``attn``              ``attn`` (output)      a position: attention's output (before any post-norm)
``mlp``               ``mlp`` (output)       a position: the MLP's output (before any post-norm)
``heads``             ``attn_heads`` (input  a head, all positions: the head's slice of the input of
                      of ``attn_out``)       attention's output projection (n_heads x head_dim)
``neurons``           ``mlp_act`` (input of  a neuron, all positions: one hidden unit of the MLP
                      ``mlp_down``)
====================  =====================  =====================================================

Positions are columns of the left-padded :class:`~residlab.analyses.patching.pairs.PairBatch`. A
site patches its unit at every layer of its window (``window`` consecutive layers from ``layer``,
as in causal tracing; 1 = a single layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from residlab.core.errors import ResidlabError

Unit = Literal["position", "head", "neuron"]


@dataclass(frozen=True)
class SiteFamily:
    """A component family: the intervention site it reads and what one unit of it is."""

    name: str
    site: str
    unit: Unit


FAMILIES: dict[str, SiteFamily] = {
    f.name: f
    for f in (
        SiteFamily("resid", "block", "position"),
        SiteFamily("attn", "attn", "position"),
        SiteFamily("mlp", "mlp", "position"),
        SiteFamily("heads", "attn_heads", "head"),
        SiteFamily("neurons", "mlp_act", "neuron"),
    )
}
DEFAULT_FAMILIES = ("resid", "attn", "mlp", "heads")


def get_families(names: Sequence[str]) -> list[SiteFamily]:
    """The families called ``names`` (deduplicated, in order), or a clear error."""
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ResidlabError(
            f"unknown site famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}."
            if unknown
            else "no site family was given.",
            hint=f"use some of {', '.join(FAMILIES)}.",
        )
    return [FAMILIES[n] for n in dict.fromkeys(names)]


@dataclass(frozen=True)
class PatchSite:
    """One patched unit: ``family``'s unit ``index`` (position column, head or neuron) at ``layers``."""

    family: str
    layers: tuple[int, ...]
    index: int

    @property
    def layer(self) -> int:
        """The window's first layer (the row of a heatmap)."""
        return self.layers[0]


@dataclass(frozen=True)
class UnitShape:
    """How many units each kind has in one model and prompt batch, and a head's width."""

    positions: int
    heads: int
    head_dim: int
    neurons: int

    def count(self, unit: Unit) -> int:
        return {"position": self.positions, "head": self.heads, "neuron": self.neurons}[unit]


def site_grid(
    family: SiteFamily,
    num_layers: int,
    shape: UnitShape,
    *,
    window: int = 1,
    layers: Sequence[int] | None = None,
) -> list[PatchSite]:
    """Every site of ``family``: each window start (``layers``, default all that fit) x each unit."""
    if not 1 <= window <= num_layers:
        raise ResidlabError(f"window {window} does not fit {num_layers} layers.", hint=f"use 1..{num_layers}.")
    starts = range(num_layers - window + 1) if layers is None else layers
    for start in starts:
        if not 0 <= start <= num_layers - window:
            raise ResidlabError(
                f"a window of {window} layer(s) cannot start at layer {start} of {num_layers}.",
                hint=f"start windows at 0..{num_layers - window}.",
            )
    return [
        PatchSite(family.name, tuple(range(start, start + window)), index)
        for start in starts
        for index in range(shape.count(family.unit))
    ]


def unit_selector(family: SiteFamily, index: int, head_dim: int) -> tuple[slice | int, slice]:
    """(token columns, channels) of unit ``index`` in a site's [rows, tokens, width] value."""
    if family.unit == "position":
        return index, slice(None)
    if family.unit == "head":
        return slice(None), slice(index * head_dim, (index + 1) * head_dim)
    return slice(None), slice(index, index + 1)
