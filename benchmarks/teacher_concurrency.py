"""Teacher requests one at a time vs several in flight, against `residlab serve` on loopback.

The `teacher` and `rewrite` pair sources ask an OpenAI-compatible endpoint for one trace per problem
(``methods/asc/teacher.py``). A serving engine batches concurrent requests, so the client keeps
``--concurrency`` of them in flight. This measures what that buys: the same GSM8K *train* questions
(concise prompt, greedy, ``--max-tokens`` each) asked by ``teacher_traces`` first with concurrency 1,
then with ``--concurrency``, each into an empty cache, against one in-process server (the engine
``residlab serve`` would pick: llama.cpp for a packaged GGUF, else torch). Reports seconds per problem
of both runs, their ratio, the server's mean batch size, and how many answers are identical in both runs
(batched llama.cpp decoding may change a late greedy token; the count says how often).

    flock /tmp/residlab-heavy.lock python benchmarks/teacher_concurrency.py [--model NAME] [--problems 16]

Results: benchmarks/results/teacher_concurrency.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from provenance import commit

from residlab.data.problems import load_problems
from residlab.engines import open_engine
from residlab.methods.asc.teacher import TeacherClient, teacher_traces
from residlab.serving.loadtest import batches_between
from residlab.serving.server import ModelServer, serving_in_background

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--engine", default="auto", choices=["auto", "torch", "llamacpp"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--problems", type=int, default=16, help="GSM8K train questions asked")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "teacher_concurrency.json"))
    args = parser.parse_args()

    runner = open_engine(args.model, args.engine, dtype=args.dtype)
    problems = load_problems("gsm8k", "train", limit=args.problems)
    server = ModelServer(runner, "127.0.0.1", 0, max_batch=args.concurrency)
    runs, answers = [], []
    with serving_in_background(server):
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        for concurrency in (1, args.concurrency):
            before = server.metrics.snapshot()
            with tempfile.TemporaryDirectory() as work_dir:
                began = time.perf_counter()
                texts = teacher_traces(
                    TeacherClient(url, args.model, concurrency=concurrency),
                    problems,
                    Path(work_dir),
                    args.max_tokens,
                    progress=True,
                )
                seconds = time.perf_counter() - began
            after = server.metrics.snapshot()
            generated = after["tokens_generated"] - before["tokens_generated"]
            _, mean_batch = batches_between(before, after)
            runs.append(
                {
                    "concurrency": concurrency,
                    "seconds": round(seconds, 1),
                    "seconds_per_problem": round(seconds / len(problems), 2),
                    "tokens_generated": generated,
                    "tokens_per_s": round(generated / seconds, 1),
                    "mean_batch": round(mean_batch, 2) if mean_batch is not None else None,
                }
            )
            answers.append(texts)
            print(json.dumps(runs[-1]), flush=True)
    result = {
        "model": args.model,
        "engine": runner.kind,
        "dtype": args.dtype,
        "problems": len(problems),
        "max_tokens": args.max_tokens,
        "runs": runs,
        "speedup": round(runs[0]["seconds"] / runs[1]["seconds"], 2),
        "same_answers": sum(a == b for a, b in zip(*answers, strict=True)),
        "cpu_count": os.cpu_count(),
        "commit": commit(),
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Teacher requests in flight ({args.model}, {result['engine']}, {args.dtype}, commit {result['commit']})",
        "",
        f"{len(problems)} GSM8K train questions, concise prompt, greedy, at most {args.max_tokens} new tokens, "
        f"asked by `teacher_traces` of an in-process `residlab serve` on loopback ({os.cpu_count()} CPUs).",
        "",
        "| concurrency | seconds | s/problem | tokens/s | server's mean batch |",
        "|---|---|---|---|---|",
        *(
            f"| {r['concurrency']} | {r['seconds']} | {r['seconds_per_problem']} | {r['tokens_per_s']} | "
            f"{r['mean_batch']} |"
            for r in runs
        ),
        "",
        f"Speedup: **{result['speedup']}x**; answers identical in both runs: {result['same_answers']} of "
        f"{len(problems)}.",
        "",
        "Reproduce: `flock /tmp/residlab-heavy.lock python benchmarks/teacher_concurrency.py "
        f"--model {args.model} --problems {args.problems} --max-tokens {args.max_tokens} "
        f"--concurrency {args.concurrency}`",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
