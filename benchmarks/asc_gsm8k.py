"""ASC on GSM8K with the default model: baseline vs ASC vs concise prompt (and ASC + concise prompt).

Vector from >= 64 GSM8K *train* pairs, evaluation on >= 200 GSM8K *test* problems, greedy, batched,
same decoding for every condition. Everything is cached under --work-dir, so an interrupted run
resumes. Writes benchmarks/results/asc_gsm8k.json and .md.

    python benchmarks/asc_gsm8k.py [--pairs 64] [--limit 200] [--layer L] [--strength S] [--engine E]

The torch engine writes asc_gsm8k.{json,md}; another engine writes asc_gsm8k_<engine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--strength", default=None, help="x residual norm at the layer, or 'auto' (default: tuned)")
    parser.add_argument("--positions", default="prompt_last+generated")
    parser.add_argument("--pair-source", default="reference")
    parser.add_argument("--pair-samples", type=int, default=4, help="samples per problem (--pair-source sampled)")
    parser.add_argument("--max-concise-ratio", type=float, default=None)
    parser.add_argument("--project-out", default=None, help="second pair source to project out, e.g. sampled")
    parser.add_argument("--read", default="mean")
    parser.add_argument("--method", default="mean_diff", help="mean_diff, pca, prompt-contrast or learned")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="torch engine dtype (also used for extraction)")
    parser.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    parser.add_argument("--work-dir", default="residlab-out/benchmark")
    parser.add_argument("--stem", default=None, help="results file name (default: asc_gsm8k[_<engine>])")
    args = parser.parse_args()

    from residlab.methods.asc import CompressConfig, parse_strength, run_compress

    cfg = CompressConfig(
        model=args.model,
        kl_bound=True,  # this benchmark reports the paper's bound
        dtype=args.dtype,
        engine=args.engine,
        pairs=args.pairs,
        pair_source=args.pair_source,
        pair_samples=args.pair_samples,
        max_concise_ratio=args.max_concise_ratio,
        project_out=args.project_out,
        read=args.read,
        method=args.method,
        layer=args.layer,
        strength=parse_strength(args.strength),
        positions=args.positions,
        eval_dataset="gsm8k",
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        work_dir=args.work_dir,
    )
    report = run_compress(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    conditions = {
        name: {
            k: c[k]
            for k in (
                "accuracy",
                "accuracy_ci95",
                "mean_tokens",
                "median_tokens",
                "seconds_per_problem",
                "cut_off_share",
                "n",
            )
        }
        for name, c in report["conditions"].items()
    }
    result = {
        "model": report["model"],
        "engine": report["engine"],
        "engine_identity": report["engine_identity"],
        "dtype": report["dtype"],
        "commit": commit,
        "n_pairs": report["n_pairs"],
        "n_eval": report["n_eval"],
        "layer": report["layer"],
        "strength": report["strength"],
        "strength_applies_to": "unit vector",
        "strength_relative_to_residual_norm": report["config"]["strength"],
        "positions": args.positions,
        "method": args.method,
        "pair_source": report.get("pair_source", args.pair_source),
        "project_out": args.project_out,
        "read": args.read,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "kl_bound_strength": report["calibration"]["strength"],
        "calibration": {
            k: report["calibration"][k]
            for k in ("a", "lipschitz", "eps", "strength", "measured_kl_median", "measured_kl_p95")
        },
        **conditions,
        "token_reduction": report["comparisons"]["asc"]["token_reduction"],
        "speedup": report["comparisons"]["asc"]["speedup"],
        "comparisons_vs_baseline": report["comparisons"],
        "seconds_total": report["seconds"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("asc_gsm8k" if args.engine == "torch" else f"asc_gsm8k_{args.engine}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    run_dir = Path(cfg.run_dir())
    md = (run_dir / "report.md").read_text()
    (RESULTS / f"{stem}.md").write_text(
        f"# ASC on GSM8K ({report['model']}, {args.engine} engine, commit {commit})\n\n"
        f"Reproduce: `python benchmarks/asc_gsm8k.py --engine {args.engine} --pairs {args.pairs} --limit {args.limit}"
        + (f" --work-dir {args.work_dir} --stem {args.stem}" if args.stem else "")
        + (f" --strength {args.strength}" if args.strength is not None else "")
        + (f" --layer {args.layer}" if args.layer is not None else "")
        + (f" --pair-source {args.pair_source}" if args.pair_source != "reference" else "")
        + (f" --method {args.method}" if args.method != "mean_diff" else "")
        + (f" --project-out {args.project_out}" if args.project_out else "")
        + "`\n\n"
        + md.split("\n", 1)[1]
    )
    print(json.dumps({k: result[k] for k in ("token_reduction", "speedup")}, indent=2))


if __name__ == "__main__":
    main()
