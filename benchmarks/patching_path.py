"""AtP and RelP with gradients along the input path (``--ig-steps``): faithfulness against cost.

For each model, dataset and split, the exact effects saved by ``benchmarks/patching.py`` (its per-run
``patching.json`` under ``--work-dir``; run it first for the same split) are compared with AtP and RelP
estimates whose gradients are averaged over N midpoints of the embedding path from the corrupted to the
clean prompts (N = 0: the plain estimate at the corrupted run), for every N of ``--steps`` and the rule
sets below. Each point is one forward and one backward pass per rule set. ``seconds`` per row: the
wall-clock of AtP and of RelP with the model family's default rule sets (one backward pass per set) at N,
as ``residlab patch`` runs them: the clean run, for N > 0 the corrupted run the deltas start from, and
the passes; ``seconds_exact`` is exact patching of every family's sites, from the saved run.

``selection`` (train split only): per family group (resid + mlp, attn + heads), the (N, rules) with the
best minimum Pearson r over the group's families across the datasets, for each N.

    python benchmarks/patching.py --split train   # the exact effects, if not there yet
    python benchmarks/patching_path.py --split train --steps 0,1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from provenance import commit

RESULTS = Path(__file__).parent / "results"
RULE_SETS = {
    "none": (),
    "norm": ("norm",),
    "norm+activation": ("norm", "activation"),
    "norm+activation+gated": ("norm", "activation", "gated"),
    "norm+activation+attention": ("norm", "activation", "attention"),
    "norm+attention": ("norm", "attention"),
    "norm+gated": ("norm", "gated"),
}
FAMILY_GROUPS = (("resid", "mlp"), ("attn", "heads"))


def run_one(model: str, dataset: str, split: str, steps: list[int], work_dir: Path, threads: int) -> dict:
    from contextlib import closing

    import torch

    from residlab.analyses.patching.activations import record_values, unit_shape
    from residlab.analyses.patching.attribution import InputPath, attribute_each, estimated_effects
    from residlab.analyses.patching.faithfulness import correlation
    from residlab.analyses.patching.metrics import MetricTargets, get_metric
    from residlab.analyses.patching.pairs import encode_pairs
    from residlab.analyses.patching.relp import RelpRules
    from residlab.analyses.patching.relp_defaults import choose_rules
    from residlab.analyses.patching.sites import FAMILIES, site_grid
    from residlab.data.prompt_pairs import load_pairs
    from residlab.models.loading import load

    torch.set_num_threads(threads)
    lm = load(model)
    saved = work_dir / f"{lm.name}-{dataset}-{split}" / "patching.json"
    if not saved.exists():
        raise SystemExit(
            f"error: no exact effects at {saved}.\nhint: run python benchmarks/patching.py --models {model} "
            f"--datasets {dataset} --split {split} --work-dir {work_dir} first."
        )
    stored = json.loads(saved.read_text())
    exact = {
        f["family"]: torch.tensor(f["effects"]["exact"], dtype=torch.float64).flatten() for f in stored["families"]
    }
    pairs = load_pairs(dataset, n=stored["num_pairs"], tokenizer=lm.tokenizer, split=split)
    batch = encode_pairs(lm, pairs)
    names = sorted({FAMILIES[f].site for f in exact})
    layers = list(range(lm.num_layers))
    metric = get_metric("logit_diff")
    rule_sets = [RelpRules(**{r: r in chosen for r in ("norm", "activation", "attention", "gated")})
                 for chosen in RULE_SETS.values()]  # fmt: skip

    def timed(n: int, sets: list) -> float:
        """Wall-clock of the estimate as ``residlab patch`` runs it: the clean run, then the passes."""
        started = time.perf_counter()
        clean = record_values(lm, batch.clean_ids, batch.attention_mask, names, layers)
        targets = MetricTargets(batch.answer, batch.wrong, clean.logits.float().log_softmax(-1))
        with closing(attribute_each(lm, batch.corrupted_ids, batch.attention_mask, targets, metric,
                                    list(clean.values), sets, InputPath(batch.clean_ids, n))) as passes:  # fmt: skip
            for attribution in passes:
                del attribution
        return time.perf_counter() - started

    rows = []
    clean = record_values(lm, batch.clean_ids, batch.attention_mask, names, layers)
    corrupted = record_values(lm, batch.corrupted_ids, batch.attention_mask, names, layers)  # deltas start here
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.float().log_softmax(-1))
    shape = unit_shape(lm, clean.values, batch.num_tokens)
    for n in steps:
        default_sets = list(choose_rules(lm.arch.family, along_path=n > 0).rules.passes(list(exact)))
        seconds = {"atp": timed(n, [None]), "relp": timed(n, default_sets)}
        passes = attribute_each(lm, batch.corrupted_ids, batch.attention_mask, targets, metric, list(clean.values),
                                rule_sets, InputPath(batch.clean_ids, n))  # fmt: skip
        pearson: dict[str, dict[str, float]] = {}
        with closing(passes):
            for name, attribution in zip(RULE_SETS, passes, strict=True):
                pearson[name] = {}
                for family in exact:
                    sites = site_grid(FAMILIES[family], lm.num_layers, shape)
                    estimate = estimated_effects(attribution, clean.values, sites, shape.head_dim, corrupted.values)
                    pearson[name][family] = correlation(estimate, exact[family])[0]
                del attribution
        timed_rules = ["+".join(r.names()) or "none" for r in default_sets]
        rows.append(
            {"steps": n, "pearson": pearson, "seconds": seconds, "relp_default_rules": timed_rules,
             "threads": threads, "commit": commit()}  # per row: a rerun of some N keeps the others
        )  # fmt: skip
        print(f"  {dataset} {split} N={n}: AtP {seconds['atp']:.1f} s, RelP {seconds['relp']:.1f} s; " + "; ".join(
            f"{k} " + "/".join(f"{v:.3f}" for v in r.values()) for k, r in pearson.items()), flush=True)  # fmt: skip
    return {
        "model": lm.name,
        "dataset": dataset,
        "split": split,
        "pairs": stored["num_pairs"],
        # exact patching's time in patching.py's run (another run: compare N with N here, not with this)
        "seconds_exact_other_run": sum(f["seconds"]["exact"] for f in stored["families"]),
        "rows": rows,
        "threads": threads,
        "commit": commit(),
    }


def select(entries: list[dict]) -> dict:
    """Per model, N and family group: the rule set with the best minimum r over the group and datasets."""
    out: dict = {}
    for model in dict.fromkeys(e["model"] for e in entries):
        mine = [e for e in entries if e["model"] == model and e["split"] == "train"]
        if not mine:
            continue
        steps = sorted({r["steps"] for e in mine for r in e["rows"]})
        out[model] = {}
        for n in steps:
            rows = [r for e in mine for r in e["rows"] if r["steps"] == n]
            out[model][str(n)] = {}
            for group in FAMILY_GROUPS:
                scores = {name: min(r["pearson"][name][f] for r in rows for f in group) for name in RULE_SETS}
                best = max(scores, key=lambda k: scores[k])
                out[model][str(n)]["+".join(group)] = {"best": best, "min_r": scores[best]}
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _markdown(data: dict) -> str:
    lines = [
        "# AtP and RelP along the input path (`--ig-steps N`)",
        "",
        "Gradients averaged over N midpoints of the embedding path from the corrupted to the clean prompts "
        "(N = 0: at the corrupted run, plain AtP/RelP); Pearson r against exact patching per family. "
        "`python benchmarks/patching_path.py --split train|eval --steps 0,1,2,4,8,16` (float32, CPU, one thread). "
        "s AtP / s RelP: the measured wall-clock of each estimate at N (RelP: the model family's default rule "
        "sets at N, one backward pass each, listed below); cost: RelP's time over its time at N = 0 of the same "
        "entry (rows can come from reruns: each row's commit is in the JSON; divide benchmarks/results/"
        "patching.md's RelP speed-up by it for the speed-up at N).",
        "",
        "| model | dataset | split | N | rules | r resid | r attn | r mlp | r heads | s AtP | s RelP | cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in data.get("entries", []):
        plain = next((row["seconds"]["relp"] for row in e["rows"] if row["steps"] == 0), None)
        for row in e["rows"]:
            seconds = [f"{row['seconds'][m]:.1f}" for m in ("atp", "relp")]
            cost = f"{row['seconds']['relp'] / plain:.1f}x" if plain else "-"
            for name, r in row["pearson"].items():
                cells = [e["model"], e["dataset"], e["split"], str(row["steps"]), name]
                cells += [_fmt(r.get(f)) for f in ("resid", "attn", "mlp", "heads")]
                lines.append("| " + " | ".join([*cells, *seconds, cost]) + " |")
    timed: dict[tuple[str, str, int], list[str]] = {}
    for e in data.get("entries", []):
        for row in e["rows"]:
            timed[e["model"], e["split"], row["steps"]] = row["relp_default_rules"]
    lines += ["", "RelP's timed rule sets (the model family's defaults at N when the row ran; relp_defaults.py):", ""]
    lines += [f"- {model}, {split}, N={n}: {' / '.join(rules)}" for (model, split, n), rules in timed.items()]
    selection = data.get("selection", {})
    if selection:
        lines += ["", "## Best rules per family group and N (train pairs, min r over the group and datasets)", ""]
        lines += ["| model | N | resid+mlp: rules | min r | attn+heads: rules | min r |", "|---|---|---|---|---|---|"]
        for model, by_n in selection.items():
            for n, groups in by_n.items():
                g1, g2 = groups["resid+mlp"], groups["attn+heads"]
                lines.append(
                    f"| {model} | {n} | {g1['best']} | {_fmt(g1['min_r'])} | {g2['best']} | {_fmt(g2['min_r'])} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--datasets", default="ioi,capitals")
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--steps", default="0,1,2,4,8")
    parser.add_argument("--work-dir", default="residlab-out/benchmark-patching", help="patching.py's per-run output")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "patching_path.json"))
    args = parser.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    steps = [int(s) for s in args.steps.split(",")]
    for model in args.models.split(","):
        for dataset in args.datasets.split(","):
            entry = run_one(model, dataset, args.split, steps, Path(args.work_dir), args.threads)
            key = (entry["model"], dataset, args.split)
            previous = [e for e in data.get("entries", []) if (e["model"], e["dataset"], e["split"]) == key]
            if previous:  # a rerun replaces the rows of the steps it measured and keeps the others
                measured = {row["steps"] for row in entry["rows"]}
                rows = [row for row in previous[0]["rows"] if row["steps"] not in measured] + entry["rows"]
                entry["rows"] = sorted(rows, key=lambda row: row["steps"])
            kept = [e for e in data.get("entries", []) if (e["model"], e["dataset"], e["split"]) != key]
            data["entries"] = [*kept, entry]
            data["selection"] = select(data["entries"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=2) + "\n")
            out.with_suffix(".md").write_text(_markdown(data))


if __name__ == "__main__":
    main()
