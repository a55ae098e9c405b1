"""Load test of `residlab serve` on loopback: 32 concurrent clients with mixed steering vs one at a time.

One server (torch engine, continuous batching) with two real steering vectors extracted here from
contrast pairs (``concise`` and ``french``, at one middle layer, unit length) in its ``--vectors``
folder. The same requests (GSM8K test questions as chats, greedy, ``--max-tokens`` each; a quarter
unsteered, the rest steered by one vector or both at different strengths; every eighth streamed) run
first one at a time, then all at once from ``--clients`` client threads. Checks: zero errors and every
concurrent answer equal to its one-at-a-time answer (streamed chunks joined); a few one-at-a-time
answers are also checked against ``engine.generate`` alone, outside the server. Reports p50/p99
latency and throughput of both runs and their ratio (target: >= 3x at 32 clients).

    flock /tmp/residlab-heavy.lock python benchmarks/serve_load.py [--model NAME] [--clients 32] [--max-tokens 32]

Results: benchmarks/results/serve.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import commit

from residlab import load
from residlab.data.problems import load_problems
from residlab.engines import SamplingParams, as_engine
from residlab.recipes.extraction import extract
from residlab.serving.loadtest import (
    LoadRequest,
    batches_between,
    concurrent,
    mismatches,
    one_at_a_time,
    summarize,
)
from residlab.serving.server import ModelServer, serving_in_background
from residlab.serving.steering import SteeringRequest, VectorLibrary

CONCISE = [
    ("Answer with only the final number.", "Explain your reasoning step by step in full detail before answering."),
    ("Be brief: one line.", "Take your time and write a long, thorough explanation."),
    ("Reply in as few words as possible.", "Please elaborate at length, covering every detail."),
    ("Short answer only.", "Walk me through every single step, carefully and verbosely."),
]
FRENCH = [
    ("Réponds en français, s'il te plaît.", "Please answer in English."),
    ("Bonjour ! Comment ça va aujourd'hui ?", "Hello! How are you today?"),
    ("Le chat dort sur le canapé.", "The cat is sleeping on the sofa."),
    ("Nous allons au marché demain matin.", "We are going to the market tomorrow morning."),
]


def make_vectors(lm, layer: int, folder: Path) -> dict[str, float]:
    """Extract and save the two vectors (unit length); return each one's residual norm at ``layer``."""
    norms = {}
    for name, pairs in (("concise", CONCISE), ("french", FRENCH)):
        vector = extract(lm, pairs, layers=[layer], source=f"serve_load {name}").normalized()
        vector.save(folder / f"{name}.safetensors")
        with lm.record([layer], positions="last") as rec:
            lm.forward([p for pair in pairs for p in pair])
        norms[name] = float(rec[layer].float().norm(dim=-1).mean())
    return norms


def steering_mix(i: int, norms: dict[str, float]) -> dict | None:
    """Request ``i``'s steering: none, concise (two strengths), french, or both; strengths are fractions
    of the residual norm at the layer."""
    kind = i % 5
    if kind == 0:
        return None
    if kind == 1:
        return {"vector": "concise", "strength": 0.25 * norms["concise"]}
    if kind == 2:
        return {"vector": "concise", "strength": 0.5 * norms["concise"]}
    if kind == 3:
        return {"vector": "french", "strength": 0.4 * norms["french"]}
    return {
        "vectors": [
            {"name": "concise", "strength": 0.2 * norms["concise"]},
            {"name": "french", "strength": 0.3 * norms["french"]},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--layer", type=int, default=None, help="steering layer (default: the middle one)")
    parser.add_argument("--direct-checks", type=int, default=3, help="answers also checked outside the server")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    began = time.perf_counter()
    lm = load(args.model, dtype="float32")
    layer = args.layer if args.layer is not None else lm.num_layers // 2
    questions = [p.question for p in load_problems("gsm8k", "test", limit=args.clients)]
    with tempfile.TemporaryDirectory() as folder:
        norms = make_vectors(lm, layer, Path(folder))
        library = VectorLibrary.from_directory(folder, lm)
        requests = []
        for i, question in enumerate(questions):
            body: dict = {"messages": [{"role": "user", "content": question}], "max_tokens": args.max_tokens}
            steering = steering_mix(i, norms)
            if steering is not None:
                body["steering"] = steering
            requests.append(LoadRequest("/v1/chat/completions", body))
        solo_requests = requests
        together_requests = [
            LoadRequest(r.path, {**r.body, "stream": True}) if i % 8 == 7 else r for i, r in enumerate(requests)
        ]
        server = ModelServer(lm, "127.0.0.1", 0, vectors=library, max_batch=args.clients)
        with serving_in_background(server):
            port = server.server_address[1]
            loads = [os.getloadavg()[0]]
            solo, solo_wall = one_at_a_time(port, solo_requests)
            loads.append(os.getloadavg()[0])
            before = server.metrics.snapshot()
            together, together_wall = concurrent(port, together_requests)
            after = server.metrics.snapshot()
            loads.append(os.getloadavg()[0])
        direct = direct_checks(lm, library, requests[: args.direct_checks], args.max_tokens)

    tokens = [o.tokens for o in solo]
    solo_summary = summarize(solo, solo_wall, tokens)
    together_summary = summarize(together, together_wall, tokens)
    bad = mismatches(solo, together)
    direct_bad = [i for i, text in enumerate(direct) if text != solo[i].text]
    passes = after["forward_passes"] - before["forward_passes"]
    histogram, mean_batch = batches_between(before, after)
    speedup = together_summary["tokens_per_s"] / solo_summary["tokens_per_s"]
    result = {
        "model": args.model,
        "engine": "torch (float32)",
        "scheduler": "continuous batching",
        "threads": args.threads,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "steering_layer": layer,
        "residual_norm_at_layer": norms,
        "mix": "i%5: none, concise 0.25|0.5 x norm, french 0.4 x norm, concise 0.2 + french 0.3; every 8th streamed",
        "one_at_a_time": solo_summary,
        "concurrent": together_summary,
        "throughput_ratio": speedup,
        "target_ratio": 3.0,
        "errors": solo_summary["errors"] + together_summary["errors"],
        "mismatched_requests": bad,
        "error_messages": sorted({o.error for o in [*solo, *together] if not o.ok}),
        "direct_engine_checks": {"checked": len(direct), "mismatched": direct_bad},
        "concurrent_forward_passes": passes,
        "concurrent_batch_size": {"mean": mean_batch, "histogram": histogram},
        # the machine is shared: its 1-minute load average before, between and after the two runs
        "load_average": loads,
        "commit": commit(),
        "total_s": time.perf_counter() - began,
    }
    write(result, [o.text for o in solo], Path(args.out))
    print(json.dumps({k: result[k] for k in ("throughput_ratio", "errors", "mismatched_requests")}, indent=1))


def direct_checks(lm, library: VectorLibrary, requests: list[LoadRequest], max_tokens: int) -> list[str]:
    """The first requests' texts from ``engine.generate`` alone (no server, no batching)."""
    engine = as_engine(lm)
    texts = []
    for request in requests:
        raw = request.body.get("steering")
        resolved = library.resolve(SteeringRequest.model_validate(raw), lm) if raw else None
        generation = engine.generate(
            [request.body["messages"]],
            SamplingParams(max_new_tokens=max_tokens),
            steering=None if resolved is None else resolved.spec(),
            chat=True,
        )[0]
        texts.append(generation.text)
    return texts


def write(result: dict, texts: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "sample_texts (request i: steering i%5)": texts[:5]}, indent=2) + "\n")
    solo, together = result["one_at_a_time"], result["concurrent"]
    lines = [
        f"# Serving load: {result['model']} ({result['engine']}, {result['threads']} threads, {result['scheduler']})",
        "",
        f"commit {result['commit']}; {result['clients']} requests (GSM8K test questions as chats), greedy, "
        f"max_tokens={result['max_tokens']}; steering at layer {result['steering_layer']}: {result['mix']}.",
        "",
        "| run | wall s | tokens/s | requests/s | p50 latency s | p99 latency s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("one at a time", solo), (f"{result['clients']} concurrent clients", together)):
        lines.append(
            f"| {name} | {s['wall_s']:.1f} | {s['tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | "
            f"{s['latency_s']['p50']:.2f} | {s['latency_s']['p99']:.2f} | {s['errors']} |"
        )
    lines += [
        "",
        f"Throughput ratio (concurrent / one at a time): **{result['throughput_ratio']:.2f}x** "
        f"(target {result['target_ratio']:.0f}x). Mean batch size of the concurrent run's forward passes: "
        f"{result['concurrent_batch_size']['mean']:.1f} over {result['concurrent_forward_passes']} passes.",
        "Requests whose concurrent text differs from the one-at-a-time text: "
        f"{result['mismatched_requests'] or 'none'}; "
        f"one-at-a-time texts checked against engine.generate alone: {result['direct_engine_checks']['checked']}, "
        f"mismatched: {result['direct_engine_checks']['mismatched'] or 'none'}.",
        "",
        f"Machine load average (1 min) before / between / after the runs: "
        f"{' / '.join(f'{x:.1f}' for x in result['load_average'])} (2 cores, shared).",
        "",
        f"Reproduce: `flock /tmp/residlab-heavy.lock python benchmarks/serve_load.py --model {result['model']} "
        f"--clients {result['clients']} --max-tokens {result['max_tokens']}` ({result['total_s']:.0f} s in all).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
