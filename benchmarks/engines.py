"""Tokens/s of the torch and llama.cpp engines, unsteered and steered, side by side in one run.

Same prompts (GSM8K train questions under the step-by-step template), same token ids (one
tokenizer), fixed output length (EOS ignored), steering with a unit direction at layer 10 scaled to
10% of the residual norm there, rule ``prompt_last+generated`` (ASC's). Unsteered and steered runs
alternate, each configuration is repeated and the median is kept; the steering overhead is the ratio
unsteered tokens/s / steered tokens/s of the same configuration in the same run (1.00 = free,
1.03 = 3% slower). Writes benchmarks/results/engines.json and .md.

    python benchmarks/engines.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODEL = "qwen2.5-coder-0.5b-instruct"


def _tokens_per_s(engine, prompts, steering, new_tokens: int, batch: int) -> float:
    from residlab.engines import SamplingParams

    fixed_length = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    out = engine.generate(prompts, fixed_length, steering=steering, batch_size=batch)
    seconds = time.perf_counter() - started
    assert all(g.num_tokens == new_tokens for g in out)
    return sum(g.num_tokens for g in out) / seconds


def measure(engine, prompts, spec, new_tokens: int, batch: int, repeats: int) -> dict:
    rows = prompts[:batch]
    from residlab.engines import SamplingParams

    engine.generate(rows[:1], SamplingParams(max_new_tokens=2), batch_size=1)  # warm-up
    plain, steered = [], []
    for _ in range(repeats):
        plain.append(_tokens_per_s(engine, rows, None, new_tokens, batch))
        steered.append(_tokens_per_s(engine, rows, spec, new_tokens, batch))
    unsteered_median, steered_median = statistics.median(plain), statistics.median(steered)
    return {
        "batch_size": batch,
        "tokens_per_s_unsteered": round(unsteered_median, 2),
        "tokens_per_s_steered": round(steered_median, 2),
        "steering_overhead": round(unsteered_median / steered_median, 4),
        "raw_unsteered": [round(x, 2) for x in plain],
        "raw_steered": [round(x, 2) for x in steered],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-batches", default="1,8")
    parser.add_argument("--llamacpp-batches", default="1,8,16")
    args = parser.parse_args()

    import torch

    from residlab import SteeringVector
    from residlab.data import load_problems
    from residlab.engines import SteeringSpec, open_engine
    from residlab.methods.asc import prompts

    questions = [prompts.VERBOSE.format(question=p.question) for p in load_problems("gsm8k", "train", limit=16)]
    torch_fp32 = open_engine(MODEL, "torch", dtype="float32")
    lm = torch_fp32.lm  # type: ignore[attr-defined]
    with lm.record(layers=[10], positions="last") as rec:
        lm.forward([lm.format_prompt(q) for q in questions[:4]], add_special_tokens=False)
    residual_norm = float(rec[10].float().norm(dim=-1).mean())
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector.from_tensor(direction / direction.norm(), model=lm, layer=10)
    spec = SteeringSpec(vector, 0.1 * residual_norm, "prompt_last+generated")

    results: dict[str, list[dict]] = {}
    engines = [
        ("torch_float32", lambda: torch_fp32, args.torch_batches),
        ("torch_bfloat16", lambda: open_engine(MODEL, "torch", dtype="bfloat16"), args.torch_batches),
        ("llamacpp", lambda: open_engine(MODEL, "llamacpp"), args.llamacpp_batches),
    ]
    for name, make, batches in engines:
        with make() as engine:
            results[name] = []
            for batch in (int(b) for b in batches.split(",")):
                row = measure(engine, questions, spec, args.new_tokens, batch, args.repeats)
                results[name].append(row)
                print(name, json.dumps(row), flush=True)

    def best(name: str, key: str = "tokens_per_s_unsteered") -> float:
        return max(r[key] for r in results[name])

    def batch1(name: str) -> float:
        return next(r["tokens_per_s_unsteered"] for r in results[name] if r["batch_size"] == 1)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    payload = {
        "model": MODEL,
        "commit": commit,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "new_tokens_per_row": args.new_tokens,
        "repeats": args.repeats,
        "steering": {"layer": 10, "strength": round(spec.strength, 3), "positions": spec.positions},
        "steering_overhead_definition": "unsteered tokens/s / steered tokens/s (same run; 1.03 = 3% slower)",
        "engines": results,
        "llamacpp_vs_torch_float32_batch1": round(batch1("llamacpp") / batch1("torch_float32"), 2),
        "llamacpp_vs_torch_bfloat16_batch1": round(batch1("llamacpp") / batch1("torch_bfloat16"), 2),
        "llamacpp_best_vs_torch_best": round(best("llamacpp") / max(best("torch_float32"), best("torch_bfloat16")), 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engines.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Engines: tokens/s on {MODEL} (commit {commit})",
        "",
        f"{args.new_tokens} new tokens per row (EOS ignored), median of {args.repeats}, steering at layer 10 with "
        f"strength {spec.strength:.2f} (10% of the residual norm), rule prompt_last+generated. "
        "Overhead = unsteered / steered tokens/s from the same run.",
        "",
        "| engine | batch | unsteered tok/s | steered tok/s | steering overhead |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['batch_size']} | {r['tokens_per_s_unsteered']:.1f} | {r['tokens_per_s_steered']:.1f} "
                f"| {r['steering_overhead']:.3f} |"
            )
    lines += [
        "",
        f"llama.cpp vs torch at batch 1: {payload['llamacpp_vs_torch_float32_batch1']}x (float32), "
        f"{payload['llamacpp_vs_torch_bfloat16_batch1']}x (bfloat16); best batch vs best batch: "
        f"{payload['llamacpp_best_vs_torch_best']}x.",
        "",
        "Reproduce: `python benchmarks/engines.py`",
    ]
    (RESULTS / "engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
