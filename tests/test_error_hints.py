"""Every user-facing error residlab raises says how to fix it: no ResidlabError without a hint."""

import ast
from pathlib import Path

ERRORS = {"ResidlabError", "ModelMismatchError", "UnknownArchitectureError"}
SOURCE = Path(__file__).resolve().parents[1] / "src" / "residlab"


def test_every_raised_error_carries_a_hint():
    missing = []
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in ERRORS and len(node.args) < 2 and "hint" not in {k.arg for k in node.keywords}:
                missing.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert not missing, f"errors without a hint: {missing}"
