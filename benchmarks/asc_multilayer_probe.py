"""Train-split probe for issue 3: the concise direction at one layer vs spread over several layers.

Takes a multi-layer vector written by `residlab compress` (vector_all_layers.safetensors), normalises
each layer's direction, scales it to ``relative strength x that layer's residual norm``, and
evaluates on GSM8K *train* problems past the calibration pairs (tune on train, never on test).
Greedy, 512 new tokens, torch bf16, batch 16. Writes benchmarks/results/asc_multilayer_train.md.

    python benchmarks/asc_multilayer_probe.py --vector residlab-out/.../vector_all_layers.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GRID = [((10,), 0.35), ((8, 10, 12), 0.10), ((8, 10, 12), 0.12), ((8, 10, 12), 0.14), ((8, 10, 12), 0.16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vector", required=True)
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--work-dir", default="residlab-out/multilayer-probe")
    parser.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    parser.add_argument("--grid", default=None, help="e.g. '10:0.35;8,10,12:0.14' (layers:relative strength)")
    parser.add_argument("--out", default="asc_multilayer_train.md")
    args = parser.parse_args()

    from residlab.data import load_problems
    from residlab.engines import open_engine
    from residlab.evaluation.report import summarize
    from residlab.evaluation.runner import Condition, Decoding, evaluate
    from residlab.methods.asc import prompts
    from residlab.vectors.steering_vector import SteeringVector

    raw = SteeringVector.load(args.vector)
    residual = {int(k): v for k, v in raw.info["residual_norm"].items()}
    engine = open_engine(raw.model_name, args.engine, dtype="bfloat16")
    grid_spec = GRID
    if args.grid:
        grid_spec = [
            (tuple(int(k) for k in layers.split(",")), float(relative))
            for layers, relative in (item.split(":") for item in args.grid.split(";"))
        ]
    problems = load_problems("gsm8k", "train", offset=args.offset, limit=args.limit)
    decoding = Decoding(max_new_tokens=512, batch_size=16)

    def spread(layers: tuple[int, ...], relative: float) -> SteeringVector:
        unit = raw.select(list(layers)).normalized()
        directions = {k: unit.directions[k] * relative * residual[k] for k in layers}
        return SteeringVector(**{**unit.__dict__, "directions": directions})

    rows = []

    def label(layers: tuple[int, ...], relative: float) -> str:
        span = f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        return f"L{span}x{relative}"

    grid = [("baseline", None), *((label(ls, r), spread(ls, r)) for ls, r in grid_spec)]
    for name, vector in grid:
        condition = Condition(name, prompts.VERBOSE, vector=vector, strength=1.0 if vector is not None else 0.0)
        summary = summarize(name, evaluate(engine, problems, condition, decoding, args.work_dir, progress=False))
        rows.append(summary)
        print(f"{name:14s} acc {summary.accuracy:.1%} tokens {summary.mean_tokens:.0f}", flush=True)
    base = rows[0]
    lines = [
        "# ASC probe on GSM8K train: one layer vs several (issue 3)",
        "",
        f"Vector: `{args.vector}` ({raw.source}). {len(problems)} GSM8K train problems from offset {args.offset} "
        f"(past the calibration pairs), greedy, 512 new tokens, {engine.identity}, batch 16. Strength per layer = "
        "relative x that layer's residual norm, on the unit direction; rule prompt_last+generated.",
        "",
        "| condition | accuracy (95% CI) | mean tokens | token change | cut off |",
        "|---|---|---|---|---|",
    ]
    for s in rows:
        low, high = s.accuracy_ci95
        lines.append(
            f"| {s.name} | {s.accuracy:.1%} ({low:.1%}-{high:.1%}) | {s.mean_tokens:.0f} | "
            f"{s.mean_tokens / base.mean_tokens - 1:+.1%} | {s.cut_off_share:.1%} |"
        )
    lines += ["", f"Reproduce: `python benchmarks/asc_multilayer_probe.py --vector {args.vector}`"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
