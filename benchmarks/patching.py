"""Faithfulness of AtP and RelP to exact activation patching, per model, dataset and component family.

For each model and dataset (ioi, capitals): exact patching of every site of resid, attn, mlp (layer x
position) and heads (layer x head), AtP and RelP (the model family's default rules, see
residlab/analyses/patching/relp_defaults.py) on the same sites; Pearson and Spearman r of each estimate
against exact patching, the number of sites and each method's wall-clock (exact: per family; AtP / RelP:
one shared forward pass plus one backward pass per rule set (AtP: one of each), which serve every family,
plus the clean forward pass). Then every
one of the 16 subsets of RelP's four rules (none = AtP) against the same exact effects (exact patching
runs once; the subsets share one forward pass and take one backward pass each).

``--split eval`` (default) measures the reported pairs; ``--split train`` measures pairs disjoint from
them (data/prompt_pairs.py) and recomputes ``selection``: per architecture family and over all of them,
the rule subset that maximises the minimum Pearson r over resid, attn and mlp across both datasets on
train pairs (ties: the better minimum over heads), and the best subset per family group (resid + mlp,
attn + heads: RelP's two passes, see relp_defaults.py). ``--reselect`` recomputes ``selection`` from
the stored train runs without measuring. Entries are merged into
benchmarks/results/patching.json as each finishes; patching.md is rewritten from the JSON.

    nice -n 5 python benchmarks/patching.py [--models M,...] [--datasets ioi,capitals] [--pairs 16] [--split train]

Targets (default model, IOI and capitals): RelP Pearson >= 0.95 on resid, attn, mlp and at most 0.02
below AtP on any family; AtP and RelP >= 50x faster than exact patching of the same sites.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from provenance import commit

RESULTS = Path(__file__).parent / "results"
RULES = ("norm", "activation", "attention", "gated")
SCORED = ("resid", "attn", "mlp")  # the one-rule-set criterion's families
CRITERION = (
    "maximise the minimum Pearson r (against exact patching) over resid, attn and mlp across the IOI "
    "and capitals train pairs; ties broken by the minimum over heads"
)
# RelP runs one backward pass per rule set: the component families are split into two groups, each
# with its own rule set (the AH-rule helps resid/mlp and costs attn/heads on Qwen2's train pairs).
FAMILY_GROUPS = (("resid", "mlp"), ("attn", "heads"))
GROUP_CRITERION = (
    "per family group (resid + mlp, attn + heads): maximise the minimum Pearson r over the group's "
    "families across the IOI and capitals train pairs"
)


def subset_name(rules: tuple[str, ...]) -> str:
    return "+".join(rules) if rules else "none"


SUBSETS = [c for k in range(len(RULES) + 1) for c in itertools.combinations(RULES, k)]


def run_one(model: str, dataset: str, pairs: int, max_rows: int, split: str, out_dir: Path, threads: int = 2) -> dict:
    import torch

    from residlab.analyses.patching.faithfulness import measure_faithfulness
    from residlab.analyses.patching.relp import applied_rule_names
    from residlab.analyses.patching.report import PatchingResult
    from residlab.data.prompt_pairs import load_pairs
    from residlab.models.loading import load

    torch.set_num_threads(threads)
    lm = load(model)
    prompt_pairs = load_pairs(dataset, n=pairs, tokenizer=lm.tokenizer, split=split)
    started = time.perf_counter()
    run = measure_faithfulness(lm, prompt_pairs, max_rows=max_rows, log=lambda m: print(f"  {m}", flush=True))
    result = PatchingResult.from_run(run, model=lm.name, architecture=lm.arch.family, dataset=dataset)
    result.save(out_dir / f"{lm.name}-{dataset}-{split}")
    families = {}
    misses = {f: row.get("misses", {}).get("relp") for f, row in result.summary()["families"].items()}
    for fam in run.families:
        families[fam.family] = {
            "pearson_atp": fam.pearson.get("atp"),
            "pearson_relp": fam.pearson.get("relp"),
            "spearman_atp": fam.spearman.get("atp"),
            "spearman_relp": fam.spearman.get("relp"),
            "n_sites": fam.num_sites,
            "noop_sites": fam.noop_sites,
            "seconds_exact": fam.seconds.get("exact"),
            "seconds_atp": fam.seconds.get("atp"),
            "seconds_relp": fam.seconds.get("relp"),
            "relp_rules": subset_name(applied_rule_names(fam.rules)),
            "relp_misses": misses[fam.family],  # where RelP's squared error against exact patching sits
        }
    measured = time.perf_counter() - started
    exact_all = sum(f["seconds_exact"] for f in families.values())
    speedups = {m: exact_all / families["resid"][f"seconds_{m}"] for m in ("atp", "relp")}
    return {
        "model": lm.name,
        "architecture": lm.arch.family,
        "dataset": dataset,
        "split": split,
        "pairs": run.num_pairs,
        "tokens": len(run.tokens),
        "clean_logit_diff": run.clean_score,
        "corrupted_logit_diff": run.corrupted_score,
        "rules": list(run.rules),
        "rules_source": run.rules_source,
        "families": families,
        "all_families": {
            "n_sites": sum(f["n_sites"] for f in families.values()),
            "seconds_exact": exact_all,
            "speedup_atp": speedups["atp"],
            "speedup_relp": speedups["relp"],
        },  # fmt: skip
        "rule_subsets": rule_subsets(lm, prompt_pairs, run),
        "measure_seconds": measured,
        "total_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "commit": commit(),
    }


def rule_subsets(lm, prompt_pairs, run) -> dict:  # type: ignore[no-untyped-def]
    """RelP's Pearson r per family for every subset of the four rules ("none" is AtP)."""
    from contextlib import closing

    import torch

    from residlab.analyses.patching.activations import record_values, unit_shape
    from residlab.analyses.patching.attribution import attribute_each, estimated_effects
    from residlab.analyses.patching.faithfulness import correlation
    from residlab.analyses.patching.metrics import MetricTargets, get_metric
    from residlab.analyses.patching.pairs import encode_pairs
    from residlab.analyses.patching.relp import RelpRules
    from residlab.analyses.patching.sites import FAMILIES, site_grid

    batch = encode_pairs(lm, prompt_pairs)
    names = sorted({FAMILIES[f.family].site for f in run.families})
    layers = list(range(lm.num_layers))
    clean = record_values(lm, batch.clean_ids, batch.attention_mask, names, layers)
    corrupted = record_values(lm, batch.corrupted_ids, batch.attention_mask, names, layers)
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.float().log_softmax(-1))
    shape = unit_shape(lm, clean.values, batch.num_tokens)
    exact = {f.family: torch.tensor(f.effects["exact"], dtype=torch.float64).flatten() for f in run.families}
    out: dict = {}
    # One forward pass for all 16 subsets (the rules change no value), one backward pass each; the empty
    # subset is plain autograd (AtP).
    every = [RelpRules(**{r: r in subset for r in RULES}) for subset in SUBSETS]
    passes = attribute_each(lm, batch.corrupted_ids, batch.attention_mask, targets, get_metric("logit_diff"),
                            list(clean.values), every)  # fmt: skip
    remaining = iter(SUBSETS)
    with closing(passes):
        for attribution in passes:
            subset = next(remaining)
            row = {}
            for fam in run.families:
                sites = site_grid(FAMILIES[fam.family], lm.num_layers, shape)
                estimate = estimated_effects(attribution, clean.values, sites, shape.head_dim, corrupted.values)
                row[fam.family] = correlation(estimate, exact[fam.family])[0]
            del attribution
            out[subset_name(subset)] = row
            print(f"  {subset_name(subset)}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return out


def select(train: list[dict]) -> dict:
    """The best rule subset per architecture family and over all of them, by :data:`CRITERION`."""

    def score(entries: list[dict], subset: str) -> tuple[float, float]:
        rows = [e["rule_subsets"][subset] for e in entries]
        return min(r[f] for r in rows for f in SCORED), min(r.get("heads", 1.0) for r in rows)

    groups: dict[str, list[dict]] = {}
    for e in train:
        groups.setdefault(e["architecture"], []).append(e)
    groups["all families"] = list(train)

    def group_score(entries: list[dict], subset: str, families: tuple[str, ...]) -> float:
        return min(e["rule_subsets"][subset].get(f, 1.0) for e in entries for f in families)

    out = {}
    for group, entries in groups.items():
        scores = {subset_name(s): score(entries, subset_name(s)) for s in SUBSETS}
        best = max(scores, key=lambda s: scores[s])
        per_group = {}
        for families in FAMILY_GROUPS:
            by_subset = {subset_name(s): group_score(entries, subset_name(s), families) for s in SUBSETS}
            chosen = max(by_subset, key=lambda s: by_subset[s])
            per_group["+".join(families)] = {"best": chosen, "min_r": by_subset[chosen]}
        out[group] = {
            "best": best,
            "min_resid_attn_mlp": scores[best][0],
            "min_heads": scores[best][1],
            "per_family_group": per_group,
            "runs": sorted(f"{e['model']}/{e['dataset']}" for e in entries),
            "scores": {s: {"min_resid_attn_mlp": v[0], "min_heads": v[1]} for s, v in scores.items()},
        }
    return {"criterion": CRITERION, "group_criterion": GROUP_CRITERION, "groups": out}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(data: dict) -> str:
    lines = [
        "# Patching faithfulness: AtP and RelP against exact activation patching",
        "",
        "`nice -n 5 python benchmarks/patching.py [--split train] [--threads N]` (CPU, float32; threads "
        "per run in the JSON). Sites: resid "
        "(block output), attn, mlp (layer x position), heads (layer x head, all positions). Metric: logit "
        "difference, effects averaged over the pairs. Seconds: exact per family; AtP / RelP one clean "
        "forward + one corrupted forward and backward per rule set (AtP: one) for all families. RelP runs the "
        "model family's default rules per family group (chosen on train pairs, below).",
        "",
        "## Eval pairs",
        "",
        "| model | dataset | pairs | RelP rules | family | sites | r AtP | r RelP | rho AtP | rho RelP "
        "| s exact | s AtP | s RelP | x AtP | x RelP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = data.get("runs", [])
    for e in runs:
        every = subset_name(tuple(r for r in RULES if any(a.startswith(r + ":") for a in e["rules"])))
        for name, f in e["families"].items():
            rules = f.get("relp_rules", every)  # runs before per-family rules: one set for every family
            cells = [e["model"], e["dataset"], str(e["pairs"]), rules, name, str(f["n_sites"])]
            cells += [_fmt(f[k]) for k in ("pearson_atp", "pearson_relp", "spearman_atp", "spearman_relp")]
            cells += [_fmt(f[k], 1) for k in ("seconds_exact", "seconds_atp", "seconds_relp")]
            cells += [_fmt(f["seconds_exact"] / f[k], 0) if f[k] else "-" for k in ("seconds_atp", "seconds_relp")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "All families (AtP: every site from one pass; RelP: one pass per rule set):", ""]
    lines += ["| model | dataset | sites | s exact | x AtP | x RelP |", "|---|---|---|---|---|---|"]
    for e in runs:
        a = e["all_families"]
        lines.append(
            f"| {e['model']} | {e['dataset']} | {a['n_sites']} | {a['seconds_exact']:.1f} | "
            f"{a['speedup_atp']:.0f} | {a['speedup_relp']:.0f} |"
        )
    lines += ["", "Where RelP's rules came from:"]
    for e in runs:
        lines.append(f"- {e['model']} / {e['dataset']}: {e.get('rules_source') or 'every rule (before defaults)'}")
    selection = data.get("selection")
    if selection:
        lines += ["", "## Choosing the default rules on train pairs", "", f"Criterion: {selection['criterion']}.", ""]
        lines += ["| group | runs | best subset | min r resid/attn/mlp | min r heads | all rules | none (AtP) |"]
        lines += ["|---|---|---|---|---|---|---|"]
        full = subset_name(RULES)
        for group, g in selection["groups"].items():
            lines.append(
                f"| {group} | {', '.join(g['runs'])} | {g['best']} | {_fmt(g['min_resid_attn_mlp'])} | "
                f"{_fmt(g['min_heads'])} | {_fmt(g['scores'][full]['min_resid_attn_mlp'])} | "
                f"{_fmt(g['scores']['none']['min_resid_attn_mlp'])} |"
            )
        if "group_criterion" in selection:
            names = ["+".join(f) for f in FAMILY_GROUPS]
            lines += ["", f"Two rule sets ({selection['group_criterion']}):", ""]
            lines += ["| group | " + " | ".join(f"{n}: best subset | min r" for n in names) + " |"]
            lines += ["|---|" + "---|---|" * len(names)]
            for group, g in selection["groups"].items():
                cells = [
                    f"{g['per_family_group'][n]['best']} | {_fmt(g['per_family_group'][n]['min_r'])}" for n in names
                ]
                lines.append(f"| {group} | " + " | ".join(cells) + " |")
    for title, entries in (("Train", data.get("selection_runs", [])), ("Eval", runs)):
        lines += _subset_tables(title, entries)
    return "\n".join(lines) + "\n"


def _subset_tables(title: str, entries: list[dict]) -> list[str]:
    """Per model: Pearson r of every rule subset, per dataset and family."""
    lines: list[str] = []
    models = list(dict.fromkeys(e["model"] for e in entries if "rule_subsets" in e))
    for model in models:
        mine = [e for e in entries if e["model"] == model and "rule_subsets" in e]
        lines += ["", f"### {title} pairs, {model}: Pearson r of every rule subset", ""]
        header = ["subset"] + [f"{e['dataset']} {f}" for e in mine for f in e["families"]] + ["min r/a/m"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for subset in (subset_name(s) for s in SUBSETS):
            cells = [_fmt(e["rule_subsets"][subset][f]) for e in mine for f in e["families"]]
            low = min(e["rule_subsets"][subset][f] for e in mine for f in SCORED)
            lines.append(f"| {subset} | " + " | ".join(cells) + f" | {_fmt(low)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--datasets", default="ioi,capitals")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "patching.json"))
    parser.add_argument("--work-dir", default="residlab-out/benchmark-patching", help="per-run reports and plots")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (every method runs on them)")
    parser.add_argument("--reselect", action="store_true", help="recompute the selection from stored train runs")
    args = parser.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    if args.reselect:
        data["selection"] = select(data["selection_runs"])
        out.write_text(json.dumps(data, indent=2) + "\n")
        out.with_suffix(".md").write_text(_markdown(data))
        print(json.dumps({g: v["per_family_group"] for g, v in data["selection"]["groups"].items()}, indent=1))
        return
    key = "runs" if args.split == "eval" else "selection_runs"
    for model in args.models.split(","):
        for dataset in args.datasets.split(","):
            print(f"{model} / {dataset} / {args.split}", flush=True)
            entry = run_one(model, dataset, args.pairs, args.max_rows, args.split, Path(args.work_dir), args.threads)
            kept = [e for e in data.get(key, []) if (e["model"], e["dataset"]) != (entry["model"], dataset)]
            data[key] = kept + [entry]
            if args.split == "train":
                data["selection"] = select(data[key])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=2) + "\n")
            out.with_suffix(".md").write_text(_markdown(data))
            print(json.dumps(entry["families"], indent=1), flush=True)


if __name__ == "__main__":
    main()
