"""Pruned traces: the model's own chain of thought with its redundant parts cut, as the concise side of
an ASC pair (the ``prune``, ``prune-prose`` and ``prune-equations`` sources).

The most in-distribution concise trace there is: every token left is one the model wrote itself, and
every computation is kept, so the pair differs only in what a dense derivation leaves out. Step-by-step
instruct models announce a plan and then carry it out step by step, restating each step, and annotate
every number with its unit in ``\\text{...}``; the plan, its announcement and the units go. A teacher
that rewrites (the ``rewrite`` source) can condense further but paraphrases into a style the small
model imitates poorly and sometimes drops computations; this needs no endpoint and cannot."""

from __future__ import annotations

import re
from typing import Literal, get_args

from residlab.core.errors import ResidlabError

# How much goes, each level cutting what the one before it cuts and more: the announced plan and units;
# also every prose sentence but the last of its line; or every line that neither computes nor answers.
Cut = Literal["plan", "prose", "equations"]

# "To find X, we need to follow these steps:" -> "To find X:" (the plan it announces is dropped).
_PLAN_ANNOUNCEMENT = re.compile(r"(?m)^(To [^\n]*?), we (?:need to|will|can) follow these steps:")
# A numbered plan item: "1. Calculate the cost of ..." with nothing computed on the line.
_PLAN_ITEM = re.compile(r"^\s*\d+\.\s")
_MATH = re.compile(r"\\\[|\\\(|\\boxed|=|\$\$")
# "Let's start with the first step:" / "Let's start with step 1." on its own or before the step.
_START = re.compile(r"(?m)^Let's start with (?:the first step|step 1)[.:]?[ \t]*\n?")
# A unit after a number or a closing bracket: "60 \text{ meters/sprint}" -> "60". A \text{} label that
# opens an equation ("\text{Total} = 5") names the quantity and stays.
_UNIT = re.compile(r"(?<=[\d})])[ \t]*\\text\{[^{}\n]*\}")


def _without_plan(text: str) -> str:
    """Drop the plan: a run of two or more consecutive numbered lines, none computing anything, written
    before the first computation. Numbered step headings followed by their own work are no plan: they stay."""
    lines = text.split("\n")
    first_math = next((i for i, line in enumerate(lines) if _MATH.search(line)), len(lines))
    drop: set[int] = set()
    start = 0
    while start < first_math:
        end = start
        while end < first_math and _PLAN_ITEM.match(lines[end]):
            end += 1
        if end - start >= 2:
            drop.update(range(start, end))
        start = end + 1
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


_SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+(?=[A-Z])")


def _without_narration(text: str) -> str:
    """Keep only the last sentence of each prose line: the one that leads into the computation ("So the
    cost is:"); the sentences before it restate the question or announce the step."""
    out = []
    for line in text.split("\n"):
        if line.strip() and not _MATH.search(line) and not line.lstrip().startswith(("\\", "-", "*")):
            indent = line[: len(line) - len(line.lstrip())]
            line = indent + _SENTENCE_END.split(line.strip())[-1]
        out.append(line)
    return "\n".join(out)


def _only_equations(text: str) -> str:
    """Keep only the lines that compute or answer (an equation, display math, ``\\boxed``): the trace's
    derivation as the model wrote it, without a word of prose around it."""
    kept, in_display = [], False
    for line in text.split("\n"):
        opens, closes = line.count("\\["), line.count("\\]")
        if in_display or opens or _MATH.search(line):
            kept.append(line.strip())
        if opens != closes:  # a display block opened or closed on this line
            in_display = opens > closes
    return "\n".join(kept)


def prune_trace(text: str, *, cut: Cut = "plan") -> str:
    """``text`` without its announced plan, its "let's start" lines and the units after its numbers (and,
    with ``cut="prose"``, every prose sentence but the last of its line; with ``cut="equations"``, every
    line that neither computes nor answers); blank lines and runs of spaces collapsed. A trace without any
    of these comes back unchanged apart from that whitespace."""
    if cut not in get_args(Cut):
        raise ResidlabError(f"unknown cut {cut!r}.", hint=f"use one of {', '.join(get_args(Cut))}.")
    pruned = _PLAN_ANNOUNCEMENT.sub(r"\1:", text)
    pruned = _without_plan(pruned)
    if cut == "equations":
        pruned = _only_equations(pruned)
    elif cut == "prose":
        pruned = _without_narration(pruned)
    pruned = _START.sub("", pruned)
    pruned = _UNIT.sub("", pruned)
    pruned = re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", pruned)
    pruned = re.sub(r"(?<=\S)[ \t]{2,}", " ", pruned)
    return pruned.strip()
