"""Time `make demo`'s command (`residlab compress` with its defaults) on this machine as it is, natively.

Unlike `demo_noavx512.sh` (which emulates a CPU without AVX-512 on one that has it), this measures the CPU
it runs on and names the result file after it: `benchmarks/results/demo_time_<avx512|avx2>.{json,md}`. Run it
with models cached, the install done and nothing else running (the numbers are wall-clock).

    python benchmarks/demo_time.py [extra compress options]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGET_MINUTES = 15.0


def cpu() -> dict[str, object]:
    """This CPU's model name, core count and whether it has AVX-512 (from /proc/cpuinfo)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {
        "model": model or platform.processor(),
        "cores": os.cpu_count(),
        "avx512": any(f.startswith("avx512") for f in flags),
        "amx": any(f.startswith("amx") for f in flags),
    }


def main() -> None:
    machine = cpu()
    kind = "avx512" if machine["avx512"] else "avx2"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "residlab.cli.main", "compress", "--work-dir", work, *sys.argv[1:]]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        (report_path,) = Path(work).glob("*/report.json")
        report = json.loads(report_path.read_text())
    payload = {
        "what": "residlab compress with its defaults (what make demo runs), natively on this CPU",
        "cpu": machine,
        "commit": commit,
        "options": sys.argv[1:],
        "wall_seconds": round(wall, 1),
        "compress_seconds": report["seconds"],
        "stage_seconds": report["stage_seconds"],
        "engine": report.get("engine"),
        "n_pairs": report["n_pairs"],
        "n_eval": report["n_eval"],
        "method": report["method"],
        "strength": report["strength"],
        "conditions": report["conditions"],
        "comparisons": report["comparisons"],
        "target_minutes": TARGET_MINUTES,
        "met": wall / 60 <= TARGET_MINUTES,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"demo_time_{kind}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stages = report["stage_seconds"]
    lines = [
        f"# `make demo` timed natively on a CPU {'with' if machine['avx512'] else 'without'} AVX-512, commit {commit}",
        "",
        f"`python benchmarks/demo_time.py`: `residlab compress` with its defaults on {machine['model']} "
        f"({machine['cores']} cores, AVX-512: {'yes' if machine['avx512'] else 'no'}), models cached, install done.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in stages.items()),
        f"| **compress total** | **{report['seconds']:.0f} ({report['seconds'] / 60:.1f} min)** |",
        f"| wall clock of the command | {wall:.0f} ({wall / 60:.1f} min) |",
        "",
        f"Target: {TARGET_MINUTES:.0f} minutes: **{'met' if payload['met'] else 'missed'}**.",
        "",
        "| condition | accuracy (95% CI) | mean tokens | s/problem |",
        "|---|---|---|---|",
    ]
    for name, s in report["conditions"].items():
        low, high = s["accuracy_ci95"]
        lines.append(
            f"| {name} | {s['accuracy']:.1%} ({low:.1%}-{high:.1%}) | {s['mean_tokens']:.0f} | "
            f"{s['seconds_per_problem']:.2f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
