"""Faithfulness of AtP and RelP to exact activation patching, per model, dataset and component family.

For each model and dataset (ioi, capitals): exact patching of every site of resid, attn, mlp (layer x
position) and heads (layer x head), AtP and RelP (all rules) on the same sites; Pearson and Spearman r
of each estimate against exact patching, the number of sites and each method's wall-clock (exact: per
family; AtP / RelP: their one forward + backward pass, which serves every family, plus the clean forward
pass). Each (model, dataset) entry is merged into benchmarks/results/patching.json as it finishes, so runs
of one model or dataset at a time accumulate; patching.md is rewritten from the JSON.

    flock /tmp/residlab-heavy.lock python benchmarks/patching.py [--models M,...] [--datasets ioi,capitals] [--pairs 16]

Targets (default model, IOI and capitals): RelP Pearson >= 0.95 on resid, attn, mlp and at most 0.02
below AtP on any family; AtP and RelP >= 50x faster than exact patching of the same sites.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from provenance import commit

RESULTS = Path(__file__).parent / "results"
FIELDS = (
    "pearson_atp",
    "pearson_relp",
    "spearman_atp",
    "spearman_relp",
    "n_sites",
    "seconds_exact",
    "seconds_atp",
    "seconds_relp",
)


def run_one(model: str, dataset: str, pairs: int, max_rows: int, out_dir: Path) -> dict:
    import torch

    from residlab.analyses.patching.faithfulness import measure_faithfulness
    from residlab.analyses.patching.report import PatchingResult
    from residlab.data.prompt_pairs import load_pairs
    from residlab.models.loading import load

    torch.set_num_threads(2)
    lm = load(model)
    prompt_pairs = load_pairs(dataset, n=pairs, tokenizer=lm.tokenizer)
    started = time.perf_counter()
    run = measure_faithfulness(lm, prompt_pairs, max_rows=max_rows, log=lambda m: print(f"  {m}", flush=True))
    result = PatchingResult.from_run(run, model=lm.name, architecture=lm.arch.family, dataset=dataset)
    result.save(out_dir / f"{lm.name}-{dataset}")
    families = {}
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
        }
    exact_all = sum(f["seconds_exact"] for f in families.values())
    speedups = {m: exact_all / families["resid"][f"seconds_{m}"] for m in ("atp", "relp")}
    return {
        "all_families": {
            "n_sites": sum(f["n_sites"] for f in families.values()),
            "seconds_exact": exact_all,
            "speedup_atp": speedups["atp"],
            "speedup_relp": speedups["relp"],
        },  # fmt: skip
        "rule_ablation": rule_ablation(lm, prompt_pairs, run),
        "model": lm.name,
        "dataset": dataset,
        "pairs": run.num_pairs,
        "tokens": len(run.tokens),
        "clean_logit_diff": run.clean_score,
        "corrupted_logit_diff": run.corrupted_score,
        "rules": list(run.rules),
        "families": families,
        "total_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "commit": commit(),
    }


def rule_ablation(lm, prompt_pairs, run) -> dict:  # type: ignore[no-untyped-def]
    """RelP's Pearson r per family with each rule left out (which rule helps where)."""
    import torch

    from residlab.analyses.patching.activations import record_values, unit_shape
    from residlab.analyses.patching.attribution import attribute, estimated_effects
    from residlab.analyses.patching.faithfulness import correlation
    from residlab.analyses.patching.metrics import MetricTargets, get_metric
    from residlab.analyses.patching.pairs import encode_pairs
    from residlab.analyses.patching.relp import RelpRules
    from residlab.analyses.patching.sites import FAMILIES, site_grid

    batch = encode_pairs(lm, prompt_pairs)
    names = sorted({FAMILIES[f.family].site for f in run.families})
    clean = record_values(lm, batch.clean_ids, batch.attention_mask, names, list(range(lm.num_layers)))
    targets = MetricTargets(batch.answer, batch.wrong, clean.logits.float().log_softmax(-1))
    shape = unit_shape(lm, clean.values, batch.num_tokens)
    rules = ("norm", "activation", "attention", "gated")
    variants = {f"without_{r}": RelpRules(**{x: x != r for x in rules}) for r in rules}
    out: dict = {}
    for name, variant in variants.items():
        attribution = attribute(lm, batch.corrupted_ids, batch.attention_mask, targets, get_metric("logit_diff"),
                                list(clean.values), variant)  # fmt: skip
        out[name] = {}
        for fam in run.families:
            exact = torch.tensor(fam.effects["exact"], dtype=torch.float64).flatten()
            sites = site_grid(FAMILIES[fam.family], lm.num_layers, shape)
            out[name][fam.family] = correlation(
                estimated_effects(attribution, clean.values, sites, shape.head_dim), exact
            )[0]
        print(f"  {name}: {out[name]}", flush=True)
    return out


def _markdown(entries: list[dict]) -> str:
    lines = [
        "# Patching faithfulness: AtP and RelP against exact activation patching",
        "",
        "`flock /tmp/residlab-heavy.lock python benchmarks/patching.py` (CPU, 2 threads, float32). Sites: resid "
        "(block output), attn, mlp (layer x position), heads (layer x head, all positions). Metric: logit "
        "difference, effects averaged over the pairs. Seconds: exact per family; AtP / RelP one clean "
        "forward + one corrupted forward and backward for all families.",
        "",
        "| model | dataset | pairs | family | sites | r AtP | r RelP | rho AtP | rho RelP "
        "| s exact | s AtP | s RelP | x AtP | x RelP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        for name, f in e["families"].items():
            cells = [e["model"], e["dataset"], str(e["pairs"]), name, str(f["n_sites"])]
            cells += [_fmt(f[k]) for k in ("pearson_atp", "pearson_relp", "spearman_atp", "spearman_relp")]
            cells += [_fmt(f[k], 1) for k in ("seconds_exact", "seconds_atp", "seconds_relp")]
            cells += [_fmt(f["seconds_exact"] / f[k], 0) if f[k] else "-" for k in ("seconds_atp", "seconds_relp")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "All families together (AtP / RelP estimate every site from one pass):", ""]
    lines += ["| model | dataset | sites | s exact | x AtP | x RelP |", "|---|---|---|---|---|---|"]
    for e in entries:
        a = e["all_families"]
        lines.append(
            f"| {e['model']} | {e['dataset']} | {a['n_sites']} | {a['seconds_exact']:.1f} | "
            f"{a['speedup_atp']:.0f} | {a['speedup_relp']:.0f} |"
        )
    lines += ["", "RelP Pearson r with one rule left out:", ""]
    for e in entries:
        for variant, rs in e.get("rule_ablation", {}).items():
            cells = ", ".join(f"{k} {_fmt(v)}" for k, v in rs.items())
            lines.append(f"- {e['model']} / {e['dataset']} {variant}: {cells}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--datasets", default="ioi,capitals")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "patching.json"))
    parser.add_argument("--work-dir", default="residlab-out/benchmark-patching", help="per-run reports and plots")
    args = parser.parse_args()
    out = Path(args.out)
    entries = json.loads(out.read_text())["runs"] if out.exists() else []
    for model in args.models.split(","):
        for dataset in args.datasets.split(","):
            print(f"{model} / {dataset}", flush=True)
            entry = run_one(model, dataset, args.pairs, args.max_rows, Path(args.work_dir))
            entries = [e for e in entries if (e["model"], e["dataset"]) != (entry["model"], dataset)] + [entry]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"runs": entries}, indent=2) + "\n")
            out.with_suffix(".md").write_text(_markdown(entries))
            print(json.dumps(entry["families"], indent=1), flush=True)


if __name__ == "__main__":
    main()
