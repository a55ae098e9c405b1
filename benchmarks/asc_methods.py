"""ASC methods side by side: one row per vector method, each with constant and adaptive strength, plus
the prompt baselines (concise prompt, Chain of Draft), all on the same problems and decoding.

Methods: ``mean-diff-reference`` (the mean difference with reference solutions as the concise side),
``prompt-contrast`` (concise vs plain instruction, no traces), ``learned`` (trained from the mean
difference; the default compress vector) and the same two with ``rewrite`` pairs (the model's own
correct trace made dense by the model itself). Each runs
``run_compress`` in one shared work dir, so the baseline and prompt conditions (and the trace pairs
that mean-diff and learned share) are generated once and every record is reused on a rerun: an
interrupted run resumes where it stopped.

    python benchmarks/asc_methods.py --split train --offset 1000 --limit 24       # a tuning slice
    python benchmarks/asc_methods.py --split test --limit 200                     # the reported run
    python benchmarks/asc_methods.py --dataset math500 --split test --limit 100 --methods learned \
        --adaptive '' --prompt-baselines ''                                        # transfer

The vector is always built from GSM8K train pairs; ``--dataset math500`` evaluates it on MATH-500
(test only), which is the transfer the method claims.

Writes benchmarks/results/asc_methods.json and .md (another --model: asc_methods_<model>.json and .md; the
default model on llama.cpp, or another on torch: ``_<engine>`` added):
rows of every run so far (a rerun of the same data set, split, offset, n and pair count replaces its
rows); each row says them. Row fields: ROW_FIELDS.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

from residlab.core.io import atomic_write_text, write_json

RESULTS = Path(__file__).parent / "results"
DEFAULT = "qwen2.5-coder-0.5b-instruct"
METHODS = {
    "mean-diff-reference": {"method": "mean_diff", "pair_source": "reference"},
    "prompt-contrast": {"method": "prompt-contrast", "pair_source": "reference"},
    "learned": {"method": "learned", "pair_source": "reference"},
    # In-distribution pairs: the model's own correct trace against its dense rewrite by the model itself,
    # or by --teacher-url (kept when the rewrite still reaches the gold answer and keeps the trace's
    # computations). ``--pairs`` counts problems, and the model solves about a third of them: give ~3x
    # the pairs wanted.
    "mean-diff-rewrite": {"method": "mean_diff", "pair_source": "rewrite"},
    "learned-rewrite": {"method": "learned", "pair_source": "rewrite"},
    # The model's own correct trace pruned (plan and units cut; -prose: also its narrating sentences;
    # -equations: only its lines that compute or answer are left).
    "mean-diff-prune": {"method": "mean_diff", "pair_source": "prune"},
    "learned-prune": {"method": "learned", "pair_source": "prune"},
    "mean-diff-prune-prose": {"method": "mean_diff", "pair_source": "prune-prose"},
    "learned-prune-prose": {"method": "learned", "pair_source": "prune-prose"},
    "learned-prune-equations": {"method": "learned", "pair_source": "prune-equations"},
}
PROMPT_BASELINES = ("concise_prompt", "chain_of_draft")
ROW_FIELDS = (
    "method",  # a METHODS key (+ the template it steers under, if not the plain prompt), or a prompt baseline
    "adaptive",  # the strength schedule (None: constant strength, or not steered)
    "condition",  # the compress condition name
    "dataset",  # the evaluation problems (the vector's pairs are always GSM8K train)
    "split",
    "offset",
    "n",
    "accuracy",
    "accuracy_ci95",
    "mean_tokens",
    "token_reduction",  # 1 - mean tokens / baseline mean tokens
    "accuracy_difference",  # vs the baseline, paired
    "mcnemar_p",
    "seconds_per_problem",
    "speedup",  # baseline seconds per problem / this one's (same machine, same batch size)
    "tokens_saved_within_2pts",  # the frontier summary number and its bootstrap CI
    "tokens_saved_within_2pts_ci95",
    "layer",
    "also_layers",  # more layers steered with it (each at the same relative strength; learned: jointly)
    "strength",  # on the unit vector (x the residual norm it was given as: see the runs)
    "n_pairs",
    "learn_steps",  # the learned methods' optimiser steps
    "learn_window",  # ... the trace tokens their preference loss sees
    "learn_pairs_per_step",  # ... and the pairs per step
)


def _rows(
    label: str, report: dict[str, Any], dataset: str, split: str, offset: int, learn: Learn
) -> list[dict[str, Any]]:
    """One row per condition of a compress report (the baseline's row has no comparison)."""
    from residlab.methods.asc.conditions import parse_condition_name

    rows = []
    for name, summary in report["conditions"].items():
        steered, schedule, template = parse_condition_name(name)
        comparison = report["comparisons"].get(name, {})
        frontier = report["frontier"].get(name, {})
        # A steered condition under a prompt baseline names both (``learned+chain_of_draft``): its row must
        # not read as the plain-prompt one.
        method = (label if template == "baseline" else f"{label}+{template}") if steered else template
        rows.append(
            {
                "method": method,
                "adaptive": schedule,
                "condition": name,
                "dataset": dataset,
                "split": split,
                "offset": offset,
                "n": summary["n"],
                "accuracy": summary["accuracy"],
                "accuracy_ci95": summary["accuracy_ci95"],
                "mean_tokens": summary["mean_tokens"],
                "token_reduction": comparison.get("token_reduction", 0.0),
                "accuracy_difference": comparison.get("accuracy_difference", 0.0),
                "mcnemar_p": comparison.get("mcnemar_p", 1.0),
                "seconds_per_problem": summary["seconds_per_problem"],
                "speedup": comparison.get("speedup", 1.0),
                "tokens_saved_within_2pts": frontier.get("estimate"),
                "tokens_saved_within_2pts_ci95": frontier.get("ci95"),
                "layer": report["layer"] if steered else None,
                "also_layers": (report.get("also_layers") or None) if steered else None,
                "strength": report["strength"] if steered else None,
                "n_pairs": report["n_pairs"] if steered else None,
                **{
                    f"learn_{k}": (v if steered and report.get("learned") else None) for k, v in learn._asdict().items()
                },
            }
        )
    return rows


class Learn(NamedTuple):
    """How a learned method trained (CompressConfig's learn_* fields)."""

    steps: int
    window: int
    pairs_per_step: int


DEFAULT_LEARN = Learn(steps=12, window=96, pairs_per_step=1)  # CompressConfig's (checked in main)


def _learn(args: argparse.Namespace) -> Learn:
    return Learn(args.learn_steps, args.learn_window, args.learn_pairs_per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--adaptive", default="until-answer", help="the adaptive rows' schedule ('': none)")
    parser.add_argument(
        "--prompt-baselines", default=",".join(PROMPT_BASELINES), help="prompt-only conditions (first method)"
    )
    parser.add_argument("--dataset", default="gsm8k", choices=["gsm8k", "math500"], help="evaluation problems")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument(
        "--offset", type=int, default=None, help="first eval problem (default: train 1000, past the pairs; test 0)"
    )
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--keep", default="concise_correct")
    parser.add_argument("--strength", default=None, help="x residual norm (default: the model's tuned strength)")
    parser.add_argument(
        "--also-layers", default="", help="more layers steered with the tuned one, e.g. 8,12 (rows say '+L8,12')"
    )
    parser.add_argument("--learn-steps", type=int, default=DEFAULT_LEARN.steps)
    parser.add_argument("--learn-window", type=int, default=DEFAULT_LEARN.window, help="trace tokens the loss sees")
    parser.add_argument("--learn-pairs-per-step", type=int, default=DEFAULT_LEARN.pairs_per_step)
    parser.add_argument("--calibration-states", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--engine", default="torch", choices=["torch", "llamacpp"])
    parser.add_argument("--work-dir", default="residlab-out/asc-methods")
    parser.add_argument(
        "--teacher-url",
        default=None,
        help="rewrite pairs by this OpenAI-compatible endpoint (e.g. `residlab serve` with the 1.5B model) "
        "instead of the model itself; the rewrite rows' method names say '+teacher'",
    )
    parser.add_argument("--teacher-model", default="default", help="the model name sent to --teacher-url")
    parser.add_argument("--teacher-concurrency", type=int, default=8, help="requests in flight to --teacher-url")
    args = parser.parse_args()
    if args.dataset == "math500" and args.split != "test":
        parser.error("MATH-500 has a test split only (--split test)")
    if args.offset is None:
        args.offset = 1000 if args.split == "train" else 0
    if args.split == "train" and args.offset < args.pairs + 2 * args.calibration_states:
        parser.error("a train-split evaluation must start past the pair and calibration problems (--offset)")

    from residlab.methods.asc import CompressConfig, parse_strength, run_compress

    config = CompressConfig()
    if DEFAULT_LEARN != Learn(config.learn_steps, config.learn_window, config.learn_pairs_per_step):
        parser.error("DEFAULT_LEARN no longer matches CompressConfig's learn_* defaults: update it")

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    stem = _stem(args.model, args.engine)
    out_json = RESULTS / f"{stem}.json"
    for index, label in enumerate(m for m in args.methods.split(",") if m):
        steered = ("asc", f"asc-{args.adaptive}") if args.adaptive else ("asc",)
        prompt_only = tuple(p for p in args.prompt_baselines.split(",") if p) if index == 0 else ()
        conditions = ("baseline", *steered, *prompt_only)
        cfg = CompressConfig(
            model=args.model,
            dtype=args.dtype,
            engine=args.engine,
            pairs=args.pairs,
            keep=args.keep,
            calibration_states=args.calibration_states,
            strength=parse_strength(args.strength),
            also_layers=tuple(int(k) for k in args.also_layers.split(",") if k),
            learn_steps=args.learn_steps,
            learn_window=args.learn_window,
            learn_pairs_per_step=args.learn_pairs_per_step,
            eval_dataset=args.dataset,
            eval_split=args.split,
            eval_offset=args.offset,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            work_dir=args.work_dir,
            conditions=conditions,
            teacher_url=args.teacher_url,
            teacher_model=args.teacher_model,
            teacher_concurrency=args.teacher_concurrency,
            **METHODS[label],
        )
        if args.teacher_url and METHODS[label]["pair_source"] == "rewrite":
            label = f"{label}+teacher"  # its own rows: the self-rewrite rows stay beside them
        if cfg.also_layers:
            label = f"{label}+L{args.also_layers}"  # its own rows, beside the one-layer ones
        log(f"=== {label} ===")
        report = run_compress(cfg, log=log)
        # Read the file again just before writing, under a lock: another process (a second worker, another
        # method) may have added rows while this one ran.
        lock = (RESULTS / f".{stem}.lock").open("w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = json.loads(out_json.read_text()) if out_json.exists() else {}
        rows = {_key(r): {"dataset": "gsm8k", **r} for r in previous.get("rows", [])}  # rows from before the field
        runs = dict(previous.get("runs", {}))
        run_key = ":".join(
            str(part)
            for part in (args.dataset, args.split, args.offset, args.limit, label, args.pairs, args.strength or "tuned")
        )
        if _learn(args) != DEFAULT_LEARN:
            run_key += ":" + ":".join(str(v) for v in _learn(args))
        runs[run_key] = {
            "seconds": report["seconds"],
            "stage_seconds": report.get("stage_seconds"),
            "layer": report["layer"],
            "strength": report["strength"],
            "n_pairs": report["n_pairs"],
            "learned": report.get("learned"),
            "calibration_strength": (report["calibration"] or {}).get("strength"),  # None: KL bound not run
            "teacher": f"{args.teacher_model} at {args.teacher_url}" if label.endswith("+teacher") else None,
        }
        for row in _rows(label, report, args.dataset, args.split, args.offset, _learn(args)):
            rows[_key(row)] = row
        _write(stem, args, list(rows.values()), runs)
        lock.close()  # releases the lock


def _stem(model: str, engine: str) -> str:
    """The results file of a model and engine: one model and one engine per file (their numbers differ).

    The default model on torch is ``asc_methods``, another model on llama.cpp (how it was first measured:
    the 1.5B) ``asc_methods_<model>``; any other engine adds ``_<engine>``."""
    stem = "asc_methods" if model == DEFAULT else f"asc_methods_{model.replace('/', '_')}"
    usual = "torch" if model == DEFAULT else "llamacpp"
    return stem if engine == usual else f"{stem}_{engine}"


def _key(row: dict[str, Any]) -> str:
    """What identifies a row: a rerun of the same run replaces it (the strength rounded: a re-extraction on
    other threads differs in its last digits)."""
    strength = row.get("strength")
    parts = [row.get("dataset", "gsm8k"), *(row.get(p) for p in ("split", "offset", "n", "method", "condition"))]
    return "|".join(str(p) for p in [*parts, None if strength is None else round(strength, 3), row.get("n_pairs")])


def _write(stem: str, args: argparse.Namespace, rows: list[dict[str, Any]], runs: dict[str, Any]) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    payload = {
        "model": args.model,
        "engine": args.engine,
        "dtype": args.dtype,
        "commit": commit,
        "keep": args.keep,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "schema": list(ROW_FIELDS),
        "rows": rows,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{stem}.json", payload)  # atomic: a concurrent reader never sees half a file
    lines = [
        f"# ASC methods, vectors from GSM8K train pairs ({args.model}, {args.engine} {args.dtype}, commit {commit})",
        "",
        f"Pairs: from the first --pairs GSM8K train problems ({args.keep}); the pairs column counts those kept. "
        f"Greedy, {args.max_new_tokens} new tokens at most, batch {args.batch_size}. Rows of a split are on the "
        "same problems (offset..offset+n-1 of that split). s/problem and speedup are wall-clock on the machine "
        "as it was when each condition ran: on a shared machine they compare nothing.",
        "",
        "Strength: on the unit vector (a learned vector's own trained norm), with the learned methods' steps (x pairs "
        "per step) and, where not 96, the trace tokens their loss saw.",
        "",
        "| data | split | offset | method | adaptive | pairs | strength | n | accuracy (95% CI) | mean tokens "
        "| reduction | acc. diff "
        "| McNemar p | s/problem | speedup | tokens saved within 2 pts (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["accuracy_ci95"]
        saved = r["tokens_saved_within_2pts"]
        ci = r["tokens_saved_within_2pts_ci95"]
        saved_text = f"{saved:.1%} ({ci[0]:.1%} to {ci[1]:.1%})" if saved is not None else "-"
        strength = "-" if r.get("strength") is None else f"{r['strength']:.2f}"
        if r.get("learn_steps"):
            pairs_per_step = r.get("learn_pairs_per_step") or 1
            steps = f"{r['learn_steps']} x {pairs_per_step}" if pairs_per_step > 1 else str(r["learn_steps"])
            window = r.get("learn_window") or DEFAULT_LEARN.window
            strength += f" ({steps} steps" + (f", {window} tok)" if window != DEFAULT_LEARN.window else ")")
        lines.append(
            f"| {r.get('dataset', 'gsm8k')} | {r['split']} | {r['offset']} | {r['method']} | "
            f"{r['adaptive'] or '-'} | {r['n_pairs'] or '-'} | {strength} | {r['n']} | "
            f"{r['accuracy']:.1%} ({low:.1%}-{high:.1%}) | "
            f"{r['mean_tokens']:.0f} | {r['token_reduction']:+.1%} | {r['accuracy_difference']:+.1%} | "
            f"{r['mcnemar_p']:.3f} | {r['seconds_per_problem']:.2f} | {r['speedup']:.2f}x | {saved_text} |"
        )
    lines += [
        "",
        f"Reproduce: `flock /tmp/residlab-heavy.lock python benchmarks/asc_methods.py --model {args.model} "
        f"--engine {args.engine} --dtype {args.dtype} --dataset {args.dataset} "
        f"--split {args.split} "
        f"--offset {args.offset} --limit {args.limit} --pairs {args.pairs} --methods {args.methods}"
        + (f" --teacher-url {args.teacher_url} --teacher-model {args.teacher_model}" if args.teacher_url else "")
        + "`",
    ]
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
