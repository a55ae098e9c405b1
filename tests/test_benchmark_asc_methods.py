"""benchmarks/asc_methods.py: each compress condition becomes a row that says what it is."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "asc_methods.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asc_methods_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_name_the_prompt_a_steered_condition_runs_under() -> None:
    script = _script()
    summary = {"n": 4, "accuracy": 0.5, "accuracy_ci95": [0.1, 0.9], "mean_tokens": 100.0, "seconds_per_problem": 1.0}
    names = (
        "baseline",
        "asc",
        "asc-until-answer",
        "chain_of_draft",
        "asc+chain_of_draft",
        "asc-until-answer+concise_prompt",
    )
    report = {
        "conditions": {name: summary for name in names},
        "comparisons": {},
        "frontier": {},
        "layer": 10,
        "strength": 3.4,
        "n_pairs": 16,
        "learned": True,
    }
    rows = script._rows("learned", report, "gsm8k", "train", 1000, script.Learn(12, 96, 1))
    methods = {row["condition"]: (row["method"], row["adaptive"]) for row in rows}
    assert methods == {
        "baseline": ("baseline", None),
        "asc": ("learned", None),
        "asc-until-answer": ("learned", "until-answer"),
        "chain_of_draft": ("chain_of_draft", None),
        "asc+chain_of_draft": ("learned+chain_of_draft", None),
        "asc-until-answer+concise_prompt": ("learned+concise_prompt", "until-answer"),
    }
    # Each condition is its own row when the results file is merged.
    assert len({script._key(row) for row in rows}) == len(names)
    steered = [row for row in rows if row["condition"].startswith("asc")]
    assert all(row["learn_steps"] == 12 and row["layer"] == 10 for row in steered)
    assert all(row["strength"] is None for row in rows if not row["condition"].startswith("asc"))
