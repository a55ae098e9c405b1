"""The ASC evaluation conditions: the prompt templates by name (one map, used by compress, eval and
sweep) and the steered / unsteered conditions compress compares.

A compress condition name says what it is: ``asc`` steers, ``concise_prompt`` asks for a concise
answer, ``asc+concise_prompt`` does both, anything else is the plain (step by step) prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from residlab.core.errors import ResidlabError
from residlab.evaluation.runner import Condition
from residlab.methods.asc import prompts
from residlab.vectors.steering_vector import SteeringVector

TEMPLATES: dict[str, str] = {"baseline": prompts.VERBOSE, "concise_prompt": prompts.CONCISE}
STEERED_PREFIX = "asc"


def template(name: str) -> str:
    """The prompt template called ``name`` (``baseline`` or ``concise_prompt``)."""
    if name not in TEMPLATES:
        raise ResidlabError(f"unknown template {name!r}.", hint=f"use {' or '.join(TEMPLATES)}.")
    return TEMPLATES[name]


def compress_condition(name: str, vector: SteeringVector, strength: float, positions: str) -> Condition:
    """The condition ``name`` stands for: its template, and ``vector`` at ``strength`` if it steers."""
    steered = name.startswith(STEERED_PREFIX)
    return Condition(
        name,
        TEMPLATES["concise_prompt" if "concise_prompt" in name else "baseline"],
        vector=vector if steered else None,
        strength=strength if steered else 0.0,
        positions=positions,
    )


def compress_conditions(
    names: Sequence[str], vector: SteeringVector, strength: float, positions: str
) -> list[Condition]:
    """:func:`compress_condition` for every name, in order (the first is the baseline of the comparisons)."""
    return [compress_condition(name, vector, strength, positions) for name in names]
