"""Host-side cost of one decode step of the torch engine, by depth: the floor a GPU cannot go under.

On a GPU, a decode step of a 7B model at small batch is bound by two things: streaming the weights
from memory (~15 GB in bfloat16: ~4.5 ms at an H100's 3.35 TB/s) and the host's Python/launch work
for every module of every block (transformers' eager forward, residlab's tracker and steering
hooks). The second does not depend on the width of the model, so it is measured here, on the CPU, on
random models of the real depths (24 and 28 blocks) but tiny width (64), where the arithmetic is
negligible: what is left is the per-step host overhead, with and without steering. It is measured
as this process's CPU time on one torch thread, which other jobs sharing the cores do not inflate. The README's
cluster estimate uses it. (A CPU core launching CUDA kernels does this same Python work plus the
launches themselves, so this is a lower bound for the GPU's host time.)

Writes benchmarks/results/step_overhead.json and .md.

    python benchmarks/step_overhead.py [--new-tokens 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def ms_per_step(engine, prompts, steering, new_tokens: int, batch: int, repeats: int) -> float:
    """Median CPU time of this process per step (one torch thread: CPU time is host time even when
    other jobs share the machine's cores, which wall-clock time is not)."""
    from residlab.engines import SamplingParams

    fixed = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    runs = []
    for _ in range(repeats):
        started = time.process_time()
        engine.generate(prompts[:batch], fixed, steering=steering, batch_size=batch, chat=False)
        runs.append(1000 * (time.process_time() - started) / new_tokens)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from residlab import SteeringVector
    from residlab.engines import SteeringSpec, as_engine
    from residlab.testing import tiny_model

    torch.set_num_threads(1)
    prompts = [f"Question {i}: how many clips did Natalia sell in April and May?" for i in range(32)]
    rows = []
    for depth in (24, 28):
        lm = tiny_model("qwen2", layers=depth)
        engine = as_engine(lm)
        vector = SteeringVector.from_tensor(torch.randn(lm.hidden_size), model=lm, layer=depth // 2)
        spec = SteeringSpec(vector, 1.0, "prompt_last+generated")
        ms_per_step(engine, prompts, None, 4, 1, 1)  # warm-up
        for batch in (1, 32):
            row = {
                "blocks": depth,
                "batch_size": batch,
                "ms_per_step_unsteered": round(
                    ms_per_step(engine, prompts, None, args.new_tokens, batch, args.repeats), 2
                ),
                "ms_per_step_steered": round(
                    ms_per_step(engine, prompts, spec, args.new_tokens, batch, args.repeats), 2
                ),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    payload = {
        "what": "host CPU ms per decode step (process CPU time, 1 torch thread, KV cache on), random qwen2 "
        "models of width 64 at real depths",
        "commit": commit,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Host-side cost of a decode step (commit {commit})",
        "",
        f"{payload['what']}; {args.new_tokens} new tokens, median of {args.repeats}; {payload['machine']}.",
        "",
        "| blocks | batch | ms/step unsteered | ms/step steered |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['blocks']} | {r['batch_size']} | {r['ms_per_step_unsteered']:.1f} | {r['ms_per_step_steered']:.1f} |"
        for r in rows
    ]
    lines += ["", "Reproduce: `python benchmarks/step_overhead.py`"]
    (RESULTS / "step_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
