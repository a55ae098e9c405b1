"""Train-split probe for issue 3: which concise-trace source gives the best steering direction.

Builds pairs for the first ``--pairs`` GSM8K train problems from two sources, the dataset's reference
solutions and the model's own shortest correct sample (``sampled``: N samples at temperature 0.7 /
top-p 0.9 under the plain prompt, so the concise side has the model's own style and prompt and
differs only in length). Extracts both mean-over-trace vectors, and evaluates each at a few
strengths on GSM8K *train* problems past the pairs (tune on train, never on test), plus the
reference vector with the sampled direction projected out (``compress --project-out sampled``).
Everything is cached under --work-dir. Writes benchmarks/results/<--out>.

    python benchmarks/asc_pair_source_probe.py [--engine llamacpp] [--pairs 250] [--limit 64]
    python benchmarks/asc_pair_source_probe.py --limit 128 --strengths 0.35 --out asc_pair_source_train_128.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--engine", default="llamacpp", choices=["torch", "llamacpp"])
    parser.add_argument("--pairs", type=int, default=250)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--strengths", default="0.25,0.35,0.5", help="x residual norm, for the sampled vector")
    parser.add_argument("--projected-strengths", default="0.35", help="for reference minus sampled")
    parser.add_argument("--work-dir", default="residlab-out/benchmark-llamacpp")
    parser.add_argument("--out", default="asc_pair_source_train.md")
    args = parser.parse_args()

    import torch

    from residlab.data import load_problems
    from residlab.engines import open_engine
    from residlab.evaluation.report import summarize
    from residlab.evaluation.runner import Condition, Decoding, evaluate
    from residlab.methods.asc import build_pairs, extract_vector, prompts, run_dir_for
    from residlab.models.loading import load

    run_dir = run_dir_for(args.work_dir, args.model)
    lm = load(args.model, dtype="bfloat16")
    engine = open_engine(args.model, args.engine, lm=lm)
    calibration = load_problems("gsm8k", "train", limit=args.pairs)
    # Batch 8 as in the benchmark, so the verbose traces already generated there are reused.
    pair_decoding = Decoding(max_new_tokens=512, batch_size=8)
    vectors, pair_lines = {}, []
    for source in ("reference", "sampled"):
        pairs, dropped = build_pairs(
            lm,
            calibration,
            source=source,
            work_dir=run_dir / "pairs",
            decoding=pair_decoding,
            engine=engine,
            samples=args.samples,
        )
        extraction = extract_vector(lm, pairs, read="mean", batch_size=4)
        vectors[source] = extraction
        extraction.vector.save(run_dir / f"vector_all_layers_{source}.safetensors")
        ratio = statistics.median(p.concise_tokens / p.verbose_tokens for p in pairs)
        pair_lines.append(
            f"| {source} | {len(pairs)} | {statistics.mean(p.verbose_tokens for p in pairs):.0f} | "
            f"{statistics.mean(p.concise_tokens for p in pairs):.0f} | {ratio:.2f} | "
            f"{extraction.separation[args.layer]:.2f} | {extraction.relative_norm(args.layer):.1%} | {dropped} |"
        )
        print(pair_lines[-1], flush=True)
    cosines = {
        layer: float(
            torch.nn.functional.cosine_similarity(
                vectors["reference"].vector.directions[layer], vectors["sampled"].vector.directions[layer], dim=0
            )
        )
        for layer in range(lm.num_layers)
    }

    problems = load_problems("gsm8k", "train", offset=args.offset, limit=args.limit)
    decoding = Decoding(max_new_tokens=512, batch_size=16)
    grid = [("baseline", None, 0.0), ("reference", "reference", 0.35)]
    grid += [("sampled", "sampled", float(s)) for s in args.strengths.split(",") if s]
    grid += [("projected", "projected", float(s)) for s in args.projected_strengths.split(",") if s]
    rows = []
    for label, source, relative in grid:
        condition = Condition(label, prompts.VERBOSE)
        if source is not None:
            extraction = vectors["reference" if source == "projected" else source]
            vector = extraction.vector
            if source == "projected":
                vector = vector.project_out(vectors["sampled"].vector)
            unit = vector.select([args.layer]).normalized()
            condition = Condition(
                label, prompts.VERBOSE, vector=unit, strength=relative * extraction.residual_norm[args.layer]
            )
        summary = summarize(label, evaluate(engine, problems, condition, decoding, run_dir / "probe", progress=False))
        rows.append((label, relative, summary))
        print(f"{label:10s} x{relative:<5} acc {summary.accuracy:.1%} tokens {summary.mean_tokens:.0f}", flush=True)

    base = rows[0][2]
    lines = [
        "# ASC probe on GSM8K train: reference vs sampled concise traces (issue 3)",
        "",
        f"{args.model}, {engine.identity}. Pairs from the first {args.pairs} GSM8K train problems "
        f"(verbose = greedy trace under the plain prompt; both sides correct). `sampled` = the shortest "
        f"correct of {args.samples} samples (temperature 0.7, top-p 0.9) under the same plain prompt. "
        "Vectors: mean over the trace's tokens, concise - verbose.",
        "",
        "| source | pairs | verbose tokens | concise tokens | median concise/verbose | separation "
        f"(layer {args.layer}) | raw norm / residual | dropped |",
        "|---|---|---|---|---|---|---|---|",
        *pair_lines,
        "",
        "Cosine between the two vectors per layer: "
        + ", ".join(f"{k}: {c:.2f}" for k, c in cosines.items() if k % 2 == 0),
        "",
        f"Evaluation: {len(problems)} GSM8K train problems from offset {args.offset}, greedy, 512 new tokens, "
        f"batch 16, layer {args.layer}, unit vector x relative strength x residual norm, rule prompt_last+generated.",
        "",
        "| condition | strength (x residual norm) | accuracy (95% CI) | mean tokens | token change | cut off |",
        "|---|---|---|---|---|---|",
    ]
    for label, relative, s in rows:
        low, high = s.accuracy_ci95
        lines.append(
            f"| {label} | {relative} | {s.accuracy:.1%} ({low:.1%}-{high:.1%}) | {s.mean_tokens:.0f} | "
            f"{s.mean_tokens / base.mean_tokens - 1:+.1%} | {s.cut_off_share:.1%} |"
        )
    lines += [
        "",
        "`projected` = the reference vector minus its component along the sampled vector, at every layer, "
        "then normalised at the layer (what `compress --project-out sampled` builds).",
        "",
        f"Reproduce: `python benchmarks/asc_pair_source_probe.py --limit {args.limit} --strengths {args.strengths} "
        f"--projected-strengths {args.projected_strengths} --out {args.out}`",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
