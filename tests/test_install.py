"""What `pip install` resolves: residlab declares ranges, the install step pins the CPU build."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def test_torch_is_a_range_that_the_pinned_cpu_build_satisfies():
    # Regression: pyproject pinned torch==2.13.0 exactly, so residlab could not be installed beside an
    # existing GPU stack. The exact CPU pin belongs to the install step, which installs it first.
    torch = _requirements()["torch"]
    assert not any(spec.operator in ("==", "===") for spec in torch.specifier), torch
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "Makefile").read_text())
    assert pinned is not None, "the Makefile's install step pins the CPU build of torch"
    assert torch.specifier.contains(pinned.group(1))
    for newer in ("2.14.1", "2.20.0"):
        assert torch.specifier.contains(newer)  # an existing newer stack is kept, not replaced
    assert not torch.specifier.contains("2.5.0")  # below what transformers 5 supports


def test_transformers_range_matches_the_runtime_check():
    transformers = _requirements()["transformers"]
    assert not transformers.specifier.contains("4.57.6") and transformers.specifier.contains("5.0.0")
