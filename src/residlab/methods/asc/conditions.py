"""The ASC evaluation conditions: the prompt templates by name (one map, used by compress, eval and
sweep) and the steered / unsteered conditions compress compares.

A compress condition name says what it is, ``<steering>+<template>``: the steering part is ``asc``
(constant strength) or ``asc-<schedule>`` (adaptive strength, :data:`~residlab.interventions.schedules.SCHEDULES`,
e.g. ``asc-until-answer``); the template part is a :data:`TEMPLATES` name. Either part alone is a
condition too: ``asc`` steers under the plain prompt, ``chain_of_draft`` is the prompt unsteered. Any
other name is the plain (step by step) prompt, unsteered.
"""

from __future__ import annotations

from collections.abc import Sequence

from residlab.core.errors import ResidlabError
from residlab.evaluation.runner import Condition
from residlab.interventions.schedules import SCHEDULES, strength_schedule
from residlab.methods.asc import prompts
from residlab.vectors.steering_vector import SteeringVector

TEMPLATES: dict[str, str] = {
    "baseline": prompts.VERBOSE,
    "concise_prompt": prompts.CONCISE,
    "chain_of_draft": prompts.CHAIN_OF_DRAFT,
}
STEERED_PREFIX = "asc"
# Every prompt baseline with and without steering, plus adaptive steering: what a frontier compares.
PROMPT_BASELINES = ("concise_prompt", "chain_of_draft")


def template(name: str) -> str:
    """The prompt template called ``name`` (a :data:`TEMPLATES` key)."""
    if name not in TEMPLATES:
        raise ResidlabError(f"unknown template {name!r}.", hint=f"use one of {', '.join(TEMPLATES)}.")
    return TEMPLATES[name]


def parse_condition_name(name: str) -> tuple[bool, str | None, str]:
    """(steers, schedule name or None, template name) of a compress condition name."""
    head, _, tail = name.partition("+")
    if head == STEERED_PREFIX or head.startswith(STEERED_PREFIX + "-"):
        schedule = head.removeprefix(STEERED_PREFIX).removeprefix("-") or None
        if schedule is not None and schedule not in SCHEDULES:
            raise ResidlabError(
                f"unknown adaptive strength {schedule!r} in the condition {name!r}.",
                hint=f"use asc-<schedule> with one of {', '.join(SCHEDULES)}.",
            )
        return True, schedule, tail or "baseline"
    if tail:
        raise ResidlabError(
            f"cannot read the condition {name!r}.", hint="write asc+<template> or asc-<schedule>+<template>."
        )
    return False, None, head if head in TEMPLATES else "baseline"


def compress_condition(name: str, vector: SteeringVector, strength: float, positions: str) -> Condition:
    """The condition ``name`` stands for: its template, and ``vector`` at ``strength`` (with its
    schedule, if adaptive) if it steers."""
    steered, schedule, template_name = parse_condition_name(name)
    return Condition(
        name,
        template(template_name),
        vector=vector if steered else None,
        strength=strength if steered else 0.0,
        positions=positions,
        schedule=strength_schedule(schedule) if steered else None,
    )


def compress_conditions(
    names: Sequence[str], vector: SteeringVector, strength: float, positions: str
) -> list[Condition]:
    """:func:`compress_condition` for every name, in order (the first is the baseline of the comparisons)."""
    return [compress_condition(name, vector, strength, positions) for name in names]
