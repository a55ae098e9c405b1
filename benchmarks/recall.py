"""Factual recall (Lv et al. 2024, arXiv 2403.19521) on the packaged models: do the paper's three
findings (mover heads, MLP gating/amplification, final-layer suppression) hold, with the numbers.

Per model: recall accuracy on the shipped country -> capital table (80 countries) under --templates,
the DLA sum check (max |sum of parts - logit|), the top mover-head candidates (attention from the last
position to the subject, DLA), mean-ablation knockouts of the top k heads against k random heads, the
last layer's direct effect on the answer and what removing it does. Models run one after another
(each freed before the next); the full analysis of each model goes to --work-dir. Rows of models
that an earlier run wrote to --out and this run does not measure are kept (each row has its commit).

    flock /tmp/residlab-heavy.lock python benchmarks/recall.py [--models a,b] [--templates capital_of,question]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path
from typing import Any

from provenance import commit

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODELS = "qwen2.5-coder-0.5b-instruct,smollm2-135m-instruct,gemma-3-270m"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated packaged names")
    parser.add_argument("--templates", default="capital_of", help="'all' or comma-separated template names")
    parser.add_argument("--limit", type=int, default=None, help="first N countries (default: all 80)")
    parser.add_argument("--knockout-k", default="1,3,5,10")
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("residlab-out/recall-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "recall.json")
    return parser.parse_args()


def _row(result: Any, seconds: float, load_seconds: float) -> dict[str, Any]:
    final = result.final_layer
    return {
        "model": result.model,
        "family": result.family,
        "layers": result.num_layers,
        "heads": result.num_heads,
        "prompts": result.num_prompts,
        "templates": result.templates,
        "accuracy": result.clean.accuracy,
        "mean_answer_prob": result.clean.mean_prob,
        "mean_logit_diff": result.clean.mean_logit_diff,
        "dla_sum_max_error": result.dla_sum_max_error,
        "top_mover_heads": [
            {
                "head": f"L{c.layer}H{c.head}",
                "subject_attention": c.subject_attention,
                "dla": c.dla,
                "dla_diff": c.dla_diff,
                "next_mlp_along": c.mlp_along,
            }
            for c in result.candidates[:5]
        ],
        "knockouts": [
            {
                "k": k.k,
                "drop_logit_diff": k.drop_logit_diff,
                "random_drop_logit_diff": k.random_drop_logit_diff,
                "drop_accuracy": k.drop_accuracy,
                "random_drop_accuracy": k.random_drop_accuracy,
                "accuracy_after": k.after.accuracy,
                "direct_drop": k.direct_drop,
                "via_mlps": k.via_mlps,
                "via_other_attention": k.via_other_attention,
                "via_embedding": k.via_embedding,
            }
            for k in result.knockouts
        ],
        "final_layer": {
            "layer": final.layer,
            "attn_dla": final.attn_dla,
            "mlp_dla": final.mlp_dla,
            "attn_dla_centred": final.attn_dla_centred,
            "mlp_dla_centred": final.mlp_dla_centred,
            "share_prompts_suppressed": final.share_suppressed,
            "ablations": [
                {
                    "target": a.target,
                    "mode": a.mode,
                    "accuracy_after": a.after.accuracy,
                    "accuracy_change": a.accuracy_change,
                    "prob_after": a.after.mean_prob,
                    "prob_change": a.prob_change,
                }
                for a in final.ablations
            ],
        },
        "findings": {f.name: {"holds": f.holds, "evidence": f.evidence} for f in result.findings},
        "seconds_analysis": round(seconds, 1),
        "seconds_load": round(load_seconds, 1),
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Factual recall (arXiv 2403.19521) on the packaged models (commit {report['commit']})",
        "",
        f"CPU ({report['machine']}), float32, {report['config']['threads']} threads. Each model's prompt set and "
        "knockout sizes are under its evidence below; the table's knockout is the largest k.",
        "",
        "| model | prompts | accuracy | p(answer) | DLA sum max error | top mover (attn to subject, DLA ans-wrong) "
        "| top-k knockout: drop of logit diff (random k) | via MLPs | last layer DLA attn / MLP (centred) "
        "| last layer mean-ablated: accuracy / p change | movers | MLP ampl. | final suppr. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["models"]:
        top = row["top_mover_heads"][0]
        ko = row["knockouts"][-1]
        final = row["final_layer"]
        both = next(a for a in final["ablations"] if a["target"] == "attn+mlp" and a["mode"] == "mean")
        verdict = {k: {True: "holds", False: "no", None: "n/a"}[v["holds"]] for k, v in row["findings"].items()}
        lines.append(
            f"| {row['model']} | {row['prompts']} | {row['accuracy']:.1%} | {row['mean_answer_prob']:.3f} "
            f"| {row['dla_sum_max_error']:.1e} "
            f"| {top['head']} ({top['subject_attention']:.2f}, {top['dla_diff']:+.2f}) "
            f"| k={ko['k']}: {ko['drop_logit_diff']:+.2f} ({ko['random_drop_logit_diff']:+.2f}) "
            f"| {ko['via_mlps']:+.2f} "
            f"| {final['attn_dla_centred']:+.2f} / {final['mlp_dla_centred']:+.2f} "
            f"| {both['accuracy_change']:+.1%} / {both['prob_change']:+.3f} "
            f"| {verdict['mover_heads']} | {verdict['mlp_amplification']} | {verdict['final_layer_suppression']} |"
        )
    lines += ["", "## Evidence per finding", ""]
    for row in report["models"]:
        setup = row.get("config", report["config"])
        lines.append(
            f"**{row['model']}** ({row['seconds_analysis']} s; {setup['prompts_note']}, k = {setup['knockout_k']}, "
            f"{setup['random_draws']} random draws)"
        )
        lines.append("")
        for name, finding in row["findings"].items():
            lines.append(f"- {name}: **{finding['holds']}**. {finding['evidence']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _parse()
    import torch

    from residlab.analyses.recall import analyze_recall
    from residlab.data.recall_prompts import capital_prompts, parse_templates
    from residlab.models.loading import load

    torch.set_num_threads(args.threads)
    templates = parse_templates(args.templates)
    prompts = capital_prompts(templates, limit=args.limit)
    ks = [int(k) for k in args.knockout_k.split(",")]
    rows = []
    for name in args.models.split(","):
        started = time.perf_counter()
        lm = load(name, dtype="float32")
        loaded = time.perf_counter()
        result = analyze_recall(
            lm, prompts, knockout_ks=ks, random_draws=args.random_draws, batch_size=args.batch_size, progress=True
        )
        seconds = time.perf_counter() - loaded
        result.save(args.work_dir / name)
        rows.append(_row(result, seconds, loaded - started))
        print(json.dumps({k: rows[-1][k] for k in ("model", "accuracy", "dla_sum_max_error", "findings")}, indent=1))
        del lm, result
        gc.collect()
    config = {
        "templates": list(templates),
        "countries": args.limit or 80,
        "prompts_note": f"{len(prompts)} = {args.limit or 80} countries x templates {', '.join(templates)}",
        "knockout_k": ks,
        "random_draws": args.random_draws,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    for row in rows:
        row["commit"] = commit()
        row["config"] = config
    done = {row["model"] for row in rows}
    if args.out.exists():  # models measured by an earlier run (one model per run keeps each run short) stay
        before = json.loads(args.out.read_text())
        earlier = [{"config": before.get("config"), **row} for row in before.get("models", [])]
        rows = [row for row in earlier if row["model"] not in done] + rows
    report = {
        "commit": commit(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "config": config,
        "models": rows,
    }
    from residlab.core.io import atomic_write_text, write_json

    write_json(args.out, report)
    atomic_write_text(args.out.with_suffix(".md"), _markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
