"""Train-split probe (issue 14): can the default model write its own dense style when shown it?

Every steering method of issue 14 pushes the model toward a denser style of the same derivation; the
most in-distribution target is the model's own correct trace with its prose cut away
(``methods/asc/prune.py``). A vector can only move the model toward a style it can write. This probe
asks the model directly, with no vector: a few-shot prompt whose examples are ``--shots`` of its own
correct traces of GSM8K train problems ``0..--pairs-1`` (the pair problems, the first ``--shots``
correct ones in file order), pruned at each ``--cuts`` level, then the new question after
``Solution:``. It reports accuracy and tokens against the plain step-by-step prompt on GSM8K train
problems ``--offset..`` (past the pair problems; never test), and how far each output took the style:
its *equation share*, the characters left by ``prune_trace(cut="equations")`` over its own characters
(the pruned examples are at 1.0; a step-by-step answer sits near 0.4).

Greedy, 512 new tokens, batch 8; records cached under ``--work-dir`` (``pairs/`` holds the verbose
traces, ``runs/`` the conditions, the layout of ``benchmarks/asc_methods.py``: pass its work dir and
model folder to reuse them). Two processes on one work dir split the batches.

    python benchmarks/asc_in_context_probe.py --engine llamacpp --work-dir W/qwen2.5-coder-0.5b-instruct

Results: benchmarks/results/asc_in_context_train.json (+ .md).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, get_args

from provenance import commit

from residlab.core.io import atomic_write_text, write_json
from residlab.data.problems import Problem, load_problems
from residlab.engines import open_engine
from residlab.evaluation.records import EvalRecord
from residlab.evaluation.report import compare, summarize
from residlab.evaluation.runner import Condition, Decoding, evaluate
from residlab.methods.asc import prompts
from residlab.methods.asc.prune import Cut, prune_trace

RESULTS = Path(__file__).parent / "results"
INSTRUCTION = (
    "Solve the last problem the way these examples are solved: only the computations, no words, "
    "final answer within \\boxed{{}}.\n"
)
ADOPTED = 0.8  # an output whose equation share is at least this is written in the examples' style


def _escaped(text: str) -> str:
    """``text`` safe inside a ``str.format`` template (the examples' LaTeX braces)."""
    return text.replace("{", "{{").replace("}", "}}")


def few_shot_template(examples: list[tuple[Problem, str]], cut: Cut) -> str:
    """A prompt template (``{question}``) showing each (problem, own correct trace) pruned at ``cut``."""
    parts = [INSTRUCTION]
    for problem, trace in examples:
        parts.append(f"Problem: {_escaped(problem.question)}\nSolution:\n{_escaped(prune_trace(trace, cut=cut))}\n")
    parts.append("Problem: {question}\nSolution:")
    return "\n".join(parts)


def equation_share(text: str) -> float:
    """The share of ``text``'s characters that only computes or answers (1.0: equations only)."""
    return len(prune_trace(text, cut="equations")) / max(1, len(text.strip()))


def _row(name: str, records: list[EvalRecord], base: list[EvalRecord]) -> dict[str, Any]:
    summary, paired = summarize(name, records), compare(base, records)
    shares = [equation_share(r.output) for r in records]
    adopted = [r for r, share in zip(records, shares, strict=True) if share >= ADOPTED]
    return {
        "condition": name,
        "n": summary.n,
        "accuracy": summary.accuracy,
        "accuracy_ci95": list(summary.accuracy_ci95),
        "mean_tokens": summary.mean_tokens,
        "token_reduction": 1 - paired.token_ratio,
        "accuracy_difference": paired.accuracy_difference,
        "mcnemar_p": paired.mcnemar_p,
        "median_equation_share": statistics.median(shares),
        "adopted": len(adopted),
        "adopted_accuracy": sum(r.correct for r in adopted) / len(adopted) if adopted else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--engine", default="auto", choices=["auto", "torch", "llamacpp"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--work-dir", default="residlab-out/asc-in-context")
    parser.add_argument("--pairs", type=int, default=96, help="GSM8K train problems the examples come from")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--cuts", default="equations,prose", help="prune levels of the examples")
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--out", default=str(RESULTS / "asc_in_context_train.json"))
    args = parser.parse_args()
    if args.offset < args.pairs:
        parser.error("--offset must be past the example problems (--pairs): evaluate on problems not shown")
    if args.shots < 1:
        parser.error("--shots must be 1 or more")
    cuts: list[Cut] = [cut for cut in args.cuts.split(",") if cut in get_args(Cut)]
    if len(cuts) != len(args.cuts.split(",")):
        parser.error(f"--cuts takes a comma list of {', '.join(get_args(Cut))}, got {args.cuts!r}")

    work = Path(args.work_dir)
    decoding = Decoding(max_new_tokens=512, batch_size=8)
    pool = load_problems("gsm8k", "train", limit=args.pairs)
    problems = load_problems("gsm8k", "train", offset=args.offset, limit=args.limit)
    rows = []
    with open_engine(args.model, args.engine, dtype=args.dtype, threads=args.threads) as engine:
        verbose = evaluate(engine, pool, Condition("verbose", prompts.VERBOSE), decoding, work / "pairs")
        examples = [(p, r.output) for p, r in zip(pool, verbose, strict=True) if r.correct][: args.shots]
        if len(examples) < args.shots:
            parser.error(f"only {len(examples)} correct traces among the first {args.pairs} train problems")
        base = evaluate(engine, problems, Condition("baseline", prompts.VERBOSE), decoding, work / "runs")
        rows.append(_row("baseline", base, base))
        for cut in cuts:
            condition = Condition(f"fewshot-{cut}-{args.shots}", few_shot_template(examples, cut))
            rows.append(_row(condition.name, evaluate(engine, problems, condition, decoding, work / "runs"), base))
    meta = {
        "commit": commit(),
        "model": args.model,
        "engine": args.engine,
        "pairs": args.pairs,
        "shots": args.shots,
        "examples": [p.id for p, _ in examples],
        "offset": args.offset,
        "limit": args.limit,
    }
    write_json(Path(args.out), {**meta, "rows": rows})
    atomic_write_text(Path(args.out).with_suffix(".md"), _markdown(meta, rows))
    print(_markdown(meta, rows))


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Few-shot with the model's own dense traces ({meta['model']}, {meta['engine']}, commit {meta['commit']})",
        "",
        f"GSM8K train problems {meta['offset']}-{meta['offset'] + meta['limit'] - 1}; examples: the model's own "
        f"correct traces of {', '.join(meta['examples'])}, pruned. Equation share: characters that compute or "
        f"answer over all characters of the output; adopted: outputs with a share >= {ADOPTED}.",
        "",
        "| condition | n | accuracy (95% CI) | mean tokens | change | acc. diff | McNemar p | median equation share "
        "| adopted | accuracy of adopted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["accuracy_ci95"]
        adopted = "-" if r["adopted_accuracy"] is None else f"{r['adopted_accuracy']:.0%}"
        change = "" if r["condition"] == "baseline" else f"{-r['token_reduction']:+.1%}"
        lines.append(
            f"| {r['condition']} | {r['n']} | {r['accuracy']:.1%} ({low:.1%}-{high:.1%}) | {r['mean_tokens']:.0f} "
            f"| {change} | {r['accuracy_difference'] * 100:+.1f} | {r['mcnemar_p']:.3f} "
            f"| {r['median_equation_share']:.2f} | {r['adopted']} | {adopted} |"
        )
    lines += [
        "",
        f"Reproduce: `python benchmarks/asc_in_context_probe.py --model {meta['model']} --engine {meta['engine']} "
        f"--pairs {meta['pairs']} --shots {meta['shots']} --offset {meta['offset']} --limit {meta['limit']}`",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
