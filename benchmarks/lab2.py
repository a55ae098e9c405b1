"""Analyses II in one file: benchmarks/results/lab2.json, one section per analysis.

The measurements live in two scripts: ``lab2_a.py`` (cka, guidance, residual, criticality) and
``lab2_b.py`` (codes, activations, rsparse), each writing its own results file as it goes (so a long
run that stops keeps the sections it finished). This script runs the sections asked for through those
scripts and then gathers every section of both results files into ``lab2.json`` (+ ``lab2.md``);
``--collect`` only gathers, without measuring again.

    flock /tmp/residlab-heavy.lock python benchmarks/lab2.py                 # everything (~30 min on 2 cores)
    python benchmarks/lab2.py --only cka,codes                                # some sections
    python benchmarks/lab2.py --collect                                       # rebuild lab2.json from the parts
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
PARTS = {  # script -> (its results file, the sections it measures)
    "lab2_a.py": ("lab2_a.json", ("cka", "guidance", "residual", "criticality")),
    "lab2_b.py": ("lab2_b.json", ("codes", "activations", "rsparse")),
}
SECTION_FLAG = {"lab2_a.py": "--only", "lab2_b.py": "--sections"}


def run_sections(chosen: list[str]) -> None:
    """Measure the ``chosen`` sections, each through the script that owns it."""
    for script, (_, owned) in PARTS.items():
        mine = [s for s in chosen if s in owned]
        if mine:
            subprocess.run([sys.executable, str(HERE / script), SECTION_FLAG[script], ",".join(mine)], check=True)


def _part_sections(results: Path, owned: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sections, provenance) of one part's results file (the two parts nest their sections differently)."""
    if not results.is_file():
        return {}, {}
    data = json.loads(results.read_text())
    nested = data.get("sections", data)
    found = {name: nested[name] for name in owned if name in nested}
    provenance = {k: data[k] for k in ("commit", "machine", "model") if k in data}
    return found, provenance


def collect(out: Path) -> dict[str, Any]:
    """Gather both parts' sections into ``out`` (JSON) and a markdown digest beside it."""
    sections: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    for script, (results_name, owned) in PARTS.items():
        found, provenance = _part_sections(RESULTS / results_name, owned)
        sections.update(found)
        for name in found:
            where = {"script": f"benchmarks/{script}", "results": f"benchmarks/results/{results_name}"}
            sources[name] = {**where, **provenance}
    payload = {"sections": sections, "sources": sources}
    out.write_text(json.dumps(payload, indent=1, default=str))
    lines = ["# Analyses II: every section", "", "| section | measured by | commit |", "|---|---|---|"]
    lines += [f"| {name} | {src['script']} | {src.get('commit', '?')} |" for name, src in sources.items()]
    lines += ["", "The numbers, section by section: `lab2_a.md` and `lab2_b.md` beside this file.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    return payload


def main() -> None:
    every = [s for _, owned in PARTS.values() for s in owned]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(every), help=f"sections among {', '.join(every)}")
    parser.add_argument("--collect", action="store_true", help="only gather the parts' results into lab2.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "lab2.json")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(every))
    if unknown:
        parser.error(f"unknown sections {unknown}; use {', '.join(every)}")
    if not args.collect:
        run_sections(chosen)
    payload = collect(args.out)
    print(f"{args.out}: sections {', '.join(payload['sections'])}")


if __name__ == "__main__":
    main()
