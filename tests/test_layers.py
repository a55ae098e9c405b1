"""The layers contract (pyproject.toml [tool.importlinter]): each package imports only from below."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "residlab"

pytest.importorskip("importlinter")


def lint_imports(src: Path, config: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the residlab package found under ``src`` (a fresh process, so nothing cached)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(config), "--no-cache"],
        cwd=src,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_layers():
    result = lint_imports(ROOT / "src", ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward_import"),
    [
        ("core/errors.py", "from residlab.models.lm import LanguageModel"),  # core -> models
        ("interventions/steer.py", "from residlab.models.lm import LanguageModel"),  # interventions -> models
        ("models/lm.py", "from residlab.engines import open_engine"),  # models -> engines
        ("engines/base.py", "from residlab.evaluation.runner import evaluate"),  # engines -> evaluation
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward_import):
    copy = tmp_path / "src" / "residlab"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + "\n\ndef _upward():\n" + textwrap.indent(upward_import, "    ") + "\n")
    result = lint_imports(tmp_path / "src", ROOT / "pyproject.toml")
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
