"""Residual-stream analyses II, part a: CKA, guidance, residual scaling, criticality on the packaged models.

Writes benchmarks/results/lab2_a.json (one section per analysis; sections run separately are merged
into the existing file) and lab2_a.md. Texts are held-out documents of the `wiki` corpus (its hash-chosen
eval split); the guidance experiment trains on the train split. Full results (JSON + PNG) go to
--work-dir. `sections()` maps each section name to a function returning its dict (for benchmarks/lab2.py).

    python benchmarks/lab2_a.py [--only cka,guidance,residual,criticality] [--texts 24] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provenance import commit

RESULTS = Path(__file__).parent / "results"
SECOND_MODEL = "smollm2-135m-instruct"
# the original configs' initializer_range (the GGUF files the packaged models come from do not record it)
ORIGINAL_INIT_RANGE = {SECOND_MODEL: 0.041666666666666664, "qwen2.5-coder-0.5b-instruct": 0.02}
OPTIONS: dict[str, Any] = {
    "texts": 24,
    "max_tokens": 128,
    "work_dir": Path("residlab-out/bench-lab2a"),
    "seeds": 3,
    "conditions": "baseline,guided",
}


def _texts(count: int) -> list[str]:
    from residlab.data.corpus import load_corpus

    return list(load_corpus("wiki").split("eval")[:count])


def _load(name: str):  # noqa: ANN202
    from residlab.models.loading import load

    return load(name)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def cka_section() -> dict[str, Any]:
    """Within the default model (tokens) and default vs SmolLM2-135M (words), biased and debiased."""
    from residlab.analyses.cka import analyze_cka
    from residlab.models.registry import DEFAULT_MODEL

    texts = _texts(OPTIONS["texts"])
    lm, other = _load(DEFAULT_MODEL), _load(SECOND_MODEL)
    within, t_within = _timed(lambda: analyze_cka(lm, texts, max_tokens=OPTIONS["max_tokens"]))
    between, t_between = _timed(lambda: analyze_cka(lm, texts, other, max_tokens=OPTIONS["max_tokens"]))
    within.save(OPTIONS["work_dir"] / "cka_within")
    between.save(OPTIONS["work_dir"] / "cka_between")
    return {
        "texts": len(texts),
        "within": {"model": lm.name, "examples": within.num_examples, "seconds": t_within, **within.summary()},
        "between": {
            "models": [lm.name, other.name],
            "examples": between.num_examples,
            "seconds": t_between,
            "mapping": between.mapping,
            **between.summary(),
        },
    }


def guidance_section() -> dict[str, Any]:
    """An RNN trained from scratch on wiki text, with and without CKA guidance from SmolLM2-135M's layers."""
    from residlab.analyses.guidance_experiment import GuidanceConfig, run_guidance_experiment

    cfg = GuidanceConfig(seeds=tuple(range(OPTIONS["seeds"])), conditions=tuple(OPTIONS["conditions"].split(",")))
    guide = _load(cfg.guide)
    result, seconds = _timed(lambda: run_guidance_experiment(guide, cfg, OPTIONS["work_dir"] / "guidance"))
    result.save(OPTIONS["work_dir"] / "guidance" / "result")
    runs = [
        {
            "condition": r.condition,
            "seed": r.seed,
            "final_ce": r.eval_ce[-1],
            "best_ce": min(r.eval_ce),
            "seconds": r.seconds,
        }
        for r in result.runs
    ]
    return {
        "config": result.config,
        "guide_layers": result.guide_layers,
        "train_tokens": result.train_tokens,
        "eval_tokens": result.eval_tokens,
        "eval_coverage": result.eval_coverage,
        "seconds": seconds,
        "runs": runs,
        **result.summary(),
    }


def residual_section() -> dict[str, Any]:
    """Branch/skip ratios, norm growth and the alpha sweeps on the default model (norms on SmolLM2 too)."""
    from residlab.analyses.residual_scaling import analyze_residual
    from residlab.models.registry import DEFAULT_MODEL

    texts = _texts(max(4, OPTIONS["texts"] // 4))  # one forward pass per alpha: kept small on a 2-core CPU
    out: dict[str, Any] = {"texts": len(texts)}
    for name, sweep in ((DEFAULT_MODEL, True), (SECOND_MODEL, False)):
        lm = _load(name)
        kwargs: dict[str, Any] = {} if sweep else {"alphas": (), "range_alphas": ()}
        result, seconds = _timed(
            lambda lm=lm, kwargs=kwargs: analyze_residual(lm, texts, max_tokens=OPTIONS["max_tokens"], **kwargs)
        )
        result.save(OPTIONS["work_dir"] / f"residual_{lm.name}")
        out[lm.name] = {
            "tokens": result.num_tokens,
            "seconds": seconds,
            "attn_ratio": result.attn_ratio,
            "mlp_ratio": result.mlp_ratio,
            "growth": result.growth,
            "sweeps": [
                {"name": c.name, "layers": [c.start, c.stop], "alphas": c.alphas, "ce": c.ce} for c in result.sweeps
            ],
            **result.summary(),
        }
    return out


def criticality_section() -> dict[str, Any]:
    """Trained vs freshly initialised depth profiles of the default model and of SmolLM2-135M."""
    from residlab.analyses.criticality import analyze_criticality
    from residlab.models.registry import DEFAULT_MODEL

    texts = _texts(max(4, OPTIONS["texts"] // 3))
    out: dict[str, Any] = {"texts": len(texts)}
    for name in (DEFAULT_MODEL, SECOND_MODEL):
        lm = _load(name)
        init = ORIGINAL_INIT_RANGE.get(name)
        result, seconds = _timed(
            lambda lm=lm, init=init: analyze_criticality(
                lm, texts, max_tokens=OPTIONS["max_tokens"], initializer_range=init
            )
        )
        result.save(OPTIONS["work_dir"] / f"criticality_{lm.name}")
        out[lm.name] = {
            "tokens": result.num_tokens,
            "seconds": seconds,
            "initializer_range": result.initializer_range,
            "trained": result.trained.__dict__,
            "fresh": result.fresh.__dict__,
            **result.summary(),
        }
    return out


def sections() -> dict[str, Callable[[], dict[str, Any]]]:
    """Section name -> the function that measures it."""
    return {
        "cka": cka_section,
        "guidance": guidance_section,
        "residual": residual_section,
        "criticality": criticality_section,
    }


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_markdown(data: dict[str, Any], path: Path) -> None:
    """A short human-readable digest of the JSON file (its scalar numbers per section)."""
    lines = [
        "# lab2_a: CKA, guidance, residual scaling, criticality",
        "",
        f"commit {data.get('commit')}, {data.get('machine')}",
        "",
    ]
    for name in sections():
        section = data.get(name)
        if not section:
            continue
        lines += [f"## {name}", "", "| key | value |", "|---|---|"]
        for key, value in _flatten(section):
            lines.append(f"| {key} | {_fmt(value)} |")
        lines.append("")
    path.write_text("\n".join(lines))


def _flatten(section: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in section.items():
        if isinstance(value, dict) and key not in ("config", "trained", "fresh"):
            rows += _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((prefix + key, value))
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(sections()))
    parser.add_argument("--texts", type=int, default=OPTIONS["texts"])
    parser.add_argument("--max-tokens", type=int, default=OPTIONS["max_tokens"])
    parser.add_argument("--seeds", type=int, default=OPTIONS["seeds"])
    parser.add_argument(
        "--conditions", default=OPTIONS["conditions"], help="guidance conditions (finished runs reused)"
    )
    parser.add_argument("--work-dir", type=Path, default=OPTIONS["work_dir"])
    parser.add_argument("--out", type=Path, default=RESULTS / "lab2_a.json")
    args = parser.parse_args()
    OPTIONS.update(
        texts=args.texts,
        max_tokens=args.max_tokens,
        seeds=args.seeds,
        work_dir=args.work_dir,
        conditions=args.conditions,
    )
    torch.set_num_threads(2)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.update(commit=commit(), machine=f"{platform.machine()}, torch {torch.__version__}, 2 threads")
    for name in args.only.split(","):
        fn = sections()[name.strip()]
        section, seconds = _timed(fn)
        data[name.strip()] = {**section, "section_seconds": seconds}
        args.out.write_text(json.dumps(data, indent=1, default=str))
        write_markdown(data, args.out.with_suffix(".md"))
        print(f"{name}: {seconds:.0f} s")


if __name__ == "__main__":
    main()
