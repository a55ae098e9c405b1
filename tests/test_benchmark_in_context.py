"""benchmarks/asc_in_context_probe.py: the few-shot prompt shows the examples exactly as pruned, and the
equation share tells a dense output from a step-by-step one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from residlab.data.problems import Problem
from residlab.methods.asc.prune import prune_trace

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TRACE = (
    "To find the total, we need to follow these steps:\n\n1. Find the cost of the pens.\n2. Add the tax.\n\n"
    "First, we find the cost of the pens. Each pen costs $3 and she buys 4 pens.\n"
    "\\[ 4 \\times 3 \\text{ dollars} = 12 \\text{ dollars} \\]\n"
    "Next, we add the tax of half a dollar:\n\\[ 12 + \\frac{1}{2} = 12.5 \\]\n"
    "So the total is \\(\\boxed{12.5}\\)."
)


def _script() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling provenance.py
    try:
        spec = importlib.util.spec_from_file_location("asc_in_context_probe", BENCHMARKS / "asc_in_context_probe.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_few_shot_prompt_holds_each_pruned_example_verbatim_and_ends_with_the_question() -> None:
    script = _script()
    example = Problem(
        id="gsm8k-train-00000", question="Pens cost $3 {each}. Total?", answer="12.5", solution="", dataset="gsm8k"
    )
    template = script.few_shot_template([(example, TRACE)], "equations")
    prompt = template.format(question="How many apples?")
    assert "Pens cost $3 {each}. Total?" in prompt
    assert prune_trace(TRACE, cut="equations") in prompt  # braces of \frac{1}{2}, \boxed{12.5} intact
    assert "follow these steps" not in prompt
    assert prompt.endswith("Problem: How many apples?\nSolution:")
    assert "\\boxed{}" in prompt  # the instruction's own braces


def test_equation_share_is_one_for_a_dense_trace_and_low_for_step_by_step_prose() -> None:
    script = _script()
    dense = prune_trace(TRACE, cut="equations")
    assert script.equation_share(dense) == 1.0
    assert script.equation_share(TRACE) < script.ADOPTED
