"""``residlab sweep``: accuracy vs tokens over layers x strengths x position rules, on a tuning split.

Tune on train problems (the default split, past the calibration pairs), never on the test split
that results are reported on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.core.io import write_json
from residlab.core.plotting import pyplot, save_figure
from residlab.core.types import Log
from residlab.data import load_problems
from residlab.engines import open_engine
from residlab.evaluation.report import ConditionSummary, summarize
from residlab.evaluation.runner import Condition, Decoding, Evaluator, evaluate
from residlab.methods.asc.conditions import template
from residlab.methods.asc.config import run_dir_for
from residlab.models.registry import DEFAULT_MODEL
from residlab.vectors.files import load_vector


@dataclass(frozen=True)
class SweepConfig:
    """A grid of layers x strengths x position rules, evaluated on a tuning split (train by default)."""

    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # torch: bfloat16 where the CPU runs it natively, else float32
    engine: str = "auto"
    device: str = "cpu"  # torch: auto, cpu, cuda, cuda:N or mps
    device_map: str | None = None  # torch: accelerate's "auto" spreads a large model over every GPU
    n_gpu_layers: int | None = None  # llama.cpp: layers on the GPU (None: all where the build has GPU support)
    vector: str = ""  # a multi-layer vector file (compress writes vector_all_layers.safetensors)
    layers: tuple[int, ...] = (12,)
    strengths: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)  # x the residual norm at the layer (unit vector)
    positions: tuple[str, ...] = ("prompt_last+generated",)
    template: str = "baseline"
    dataset: str = "gsm8k"
    split: str = "train"
    offset: int = 1000  # past the calibration pairs: tune on train, never on test
    limit: int = 24
    max_new_tokens: int = 512
    batch_size: int = 8
    data_dir: str | None = None
    work_dir: str = "residlab-out"


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: where it steered, how strongly, on what, and the summary of its records."""

    engine: str
    vector: str
    template: str
    dataset: str
    split: str
    offset: int
    layer: int
    relative_strength: float  # x the residual norm at the layer
    strength: float  # on the unit vector
    positions: str
    summary: ConditionSummary

    def to_json(self) -> dict[str, Any]:
        """The row of sweep.json: the settings, then the summary's fields."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "summary"}
        return {**settings, **asdict(self.summary)}


def run_sweep(cfg: SweepConfig, log: Log = print, evaluator: Evaluator = evaluate) -> dict[str, Any]:
    """Accuracy and tokens for every grid point; results in ``<run dir>/sweep.json`` and a plot.
    ``evaluator`` runs each grid point (this process by default; a Ray pool spreads the problems)."""
    prompt = template(cfg.template)
    lm = open_engine(
        cfg.model,
        cfg.engine,
        dtype=cfg.dtype,
        device=cfg.device,
        device_map=cfg.device_map,
        n_gpu_layers=cfg.n_gpu_layers,
    )
    raw = load_vector(cfg.vector, lm)
    residual = {int(k): float(v) for k, v in raw.info.get("residual_norm", {}).items()}
    problems = load_problems(cfg.dataset, cfg.split, data_dir=cfg.data_dir, offset=cfg.offset, limit=cfg.limit)
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    run_dir = run_dir_for(cfg.work_dir, cfg.model)
    rows = []
    for layer in cfg.layers:
        if layer not in raw.directions:
            raise ResidlabError(f"the vector has no direction for layer {layer}.", hint=f"it has {raw.layers}.")
        unit = raw.select([layer]).normalized()
        scale = residual.get(layer, 1.0)
        for positions in cfg.positions:
            for rel in cfg.strengths:
                strength = rel * scale
                name = "baseline" if rel == 0 else f"L{layer}-s{rel:g}-{positions}"
                condition = Condition(
                    name, prompt, vector=unit if rel else None, strength=strength, positions=positions
                )
                summary = summarize(name, evaluator(lm, problems, condition, decoding, run_dir / "runs"))
                point = SweepPoint(
                    engine=lm.identity,
                    vector=cfg.vector,
                    template=cfg.template,
                    dataset=cfg.dataset,
                    split=cfg.split,
                    offset=cfg.offset,
                    layer=layer,
                    relative_strength=rel,
                    strength=strength,
                    positions=positions,
                    summary=summary,
                )
                rows.append(point.to_json())
                log(
                    f"layer {layer:>2} strength {rel:<5g} ({strength:6.2f}) {positions:<22} acc {summary.accuracy:6.1%}"
                    f"  tokens {summary.mean_tokens:6.1f}  cut {summary.cut_off_share:5.1%}"
                )
    # sweep.json accumulates across sweeps (a later run of the same grid point replaces it)
    rows = _merge_rows(run_dir / "sweep.json", rows)
    payload = {"model": lm.name, "rows": rows}
    write_json(run_dir / "sweep.json", payload)
    _plot_sweep(rows, run_dir / "sweep.png", f"{lm.name}: {cfg.dataset} {cfg.split} n={len(problems)}")
    log(f"sweep: {run_dir / 'sweep.json'} and {run_dir / 'sweep.png'}")
    return payload


_ROW_KEY = (
    "engine",
    "vector",
    "template",
    "dataset",
    "split",
    "offset",
    "n",
    "layer",
    "relative_strength",
    "positions",
)


def _merge_rows(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import json

    old: list[dict[str, Any]] = []
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("rows", [])
        except (ValueError, AttributeError):
            old = []
    fresh = {tuple(r.get(k) for k in _ROW_KEY) for r in new}
    return [r for r in old if tuple(r.get(k) for k in _ROW_KEY) not in fresh] + new


def _plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"{Path(row.get('vector', '')).stem} L{row['layer']} {row['positions']}", []).append(row)
    for label, items in groups.items():
        items = sorted(items, key=lambda r: r["relative_strength"])
        ax.plot([r["mean_tokens"] for r in items], [r["accuracy"] for r in items], "o-", label=label)
        for r in items:
            ax.annotate(
                f"{r['relative_strength']:g}",
                (r["mean_tokens"], r["accuracy"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    ax.set_xlabel("mean generated tokens")
    ax.set_ylabel("accuracy")
    ax.set_title(title + " (labels: strength / residual norm)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
