"""``residlab sweep``: accuracy vs tokens over layers x strengths x position rules x strength schedules,
on a tuning split, with the prompt baselines and the model's own best-of-N shortest-correct oracle on
the same problems, and one summary number per method (tokens saved at accuracy within 2 points of
the baseline, with its bootstrap CI: ``evaluation.frontier``).

sweep.json accumulates rows across sweeps (several vectors, e.g. one per method), and the frontier
plot draws every method found there for the same problems on the same axes.

Tune on train problems (the default split, past the calibration pairs), never on the test split
that results are reported on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.core.io import write_json
from residlab.core.plotting import pyplot, save_figure
from residlab.core.records import JsonlStore
from residlab.core.types import Log
from residlab.data import Problem, load_problems
from residlab.engines import Engine, open_engine
from residlab.evaluation.frontier import FrontierPoint, plot_frontier, shortest_correct_oracle, tokens_saved
from residlab.evaluation.records import EvalRecord, record_key
from residlab.evaluation.report import ConditionSummary, cut_off_warning, summarize
from residlab.evaluation.runner import Condition, Decoding, Evaluator, evaluate, read_records
from residlab.interventions.schedules import strength_schedule
from residlab.methods.asc.conditions import template
from residlab.methods.asc.config import run_dir_for
from residlab.methods.asc.pairs import SAMPLE_TEMPERATURE, SAMPLE_TOP_P
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
    schedules: tuple[str, ...] = ("constant",)  # constant strength and/or interventions.schedules names
    prompt_baselines: tuple[str, ...] = ()  # templates evaluated unsteered on the same problems
    oracle_samples: int = 0  # > 0: sample the plain prompt this often per problem for the best-of-N oracle
    dataset: str = "gsm8k"
    split: str = "train"
    offset: int = 1000  # past the calibration pairs: tune on train, never on test
    limit: int = 24
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy; reasoning (R1-style) models are sampled (the ASC paper: 0.7, top-p 0.9)
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None
    work_dir: str = "residlab-out"

    def __post_init__(self) -> None:
        self.decoding()  # bad sampling settings fail here, before any model is loaded

    def decoding(self) -> Decoding:
        """How every grid point and prompt baseline is decoded."""
        return Decoding(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.batch_size)


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
    schedule: str | None = None  # the strength schedule (None: constant)
    decoding: str = "greedy"  # Decoding.describe(): rows of another decoding are other points
    correct: tuple[bool, ...] = ()  # per problem, in order (for the frontier's bootstrap)
    tokens: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The row of sweep.json: the settings, then the summary's fields, then the per-problem results."""
        skip = ("summary", "correct", "tokens")
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**settings, **asdict(self.summary), "correct": list(self.correct), "tokens": list(self.tokens)}


def run_sweep(cfg: SweepConfig, log: Log = print, evaluator: Evaluator = evaluate) -> dict[str, Any]:
    """Accuracy and tokens for every grid point and prompt baseline; results in ``<run dir>/sweep.json``,
    the grid plot ``sweep.png`` and the frontier ``frontier.png`` with its summary per method.
    ``evaluator`` runs each grid point (this process by default; a Ray pool spreads the problems)."""
    prompt = template(cfg.template)
    schedules = [None if name == "constant" else strength_schedule(name) for name in cfg.schedules]
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
    decoding = cfg.decoding()
    run_dir = run_dir_for(cfg.work_dir, cfg.model)
    point = partial(_point, cfg, lm, problems, decoding, run_dir / "runs", log, evaluator)
    rows = []
    for layer in cfg.layers:
        if layer not in raw.directions:
            raise ResidlabError(f"the vector has no direction for layer {layer}.", hint=f"it has {raw.layers}.")
        unit = raw.select([layer]).normalized()
        scale = residual.get(layer, 1.0)
        for positions in cfg.positions:
            for schedule in schedules:
                for rel in cfg.strengths:
                    if rel == 0 and schedule is not None:
                        continue  # unsteered: the schedule changes nothing
                    suffix = f"-{schedule.name}" if schedule is not None else ""
                    name = "baseline" if rel == 0 else f"L{layer}-s{rel:g}-{positions}{suffix}"
                    condition = Condition(
                        name, prompt, vector=unit if rel else None, strength=rel * scale, positions=positions,
                        schedule=schedule if rel else None,
                    )  # fmt: skip
                    rows.append(point(condition, layer, rel))
    for name in cfg.prompt_baselines:
        rows.append(point(Condition(name, template(name)), -1, 0.0, template_name=name))
    oracle = _oracle(cfg, lm, problems, run_dir, log)
    # sweep.json accumulates across sweeps (a later run of the same grid point replaces it)
    rows = _merge_rows(run_dir / "sweep.json", rows)
    title = f"{lm.name}: {cfg.dataset} {cfg.split} n={len(problems)}"
    frontier = frontier_summary(rows, cfg, len(problems), oracle, run_dir / "frontier.png", title)
    payload = {"model": lm.name, "rows": rows, "frontier": frontier}
    write_json(run_dir / "sweep.json", payload)
    _plot_sweep(rows, run_dir / "sweep.png", title)
    for method, summary in frontier["methods"].items():
        low, high = summary["ci95"]
        log(
            f"{method}: tokens saved within 2 points of the baseline {summary['estimate']:.1%} "
            f"({low:.1%} to {high:.1%})"
        )
    log(f"sweep: {run_dir / 'sweep.json'}, {run_dir / 'sweep.png'} and {run_dir / 'frontier.png'}")
    return payload


def _point(
    cfg: SweepConfig,
    lm: Engine,
    problems: list[Problem],
    decoding: Decoding,
    runs: Path,
    log: Log,
    evaluator: Evaluator,
    condition: Condition,
    layer: int,
    rel: float,
    template_name: str | None = None,
) -> dict[str, Any]:
    """Evaluate one condition and return its sweep.json row (and log it)."""
    records = evaluator(lm, problems, condition, decoding, runs)
    summary = summarize(condition.name, records)
    row = SweepPoint(
        engine=lm.identity,
        vector=cfg.vector if condition.steered else "",
        template=template_name or cfg.template,
        dataset=cfg.dataset,
        split=cfg.split,
        offset=cfg.offset,
        layer=layer,
        relative_strength=rel,
        strength=condition.strength,
        positions=condition.positions,
        summary=summary,
        schedule=condition.schedule.name if condition.schedule is not None else None,
        decoding=decoding.describe(),
        correct=tuple(bool(r.correct) for r in records),
        tokens=tuple(int(r.tokens) for r in records),
    ).to_json()
    log(
        f"{condition.name:<40} acc {summary.accuracy:6.1%}  tokens {summary.mean_tokens:6.1f}  "
        f"cut {summary.cut_off_share:5.1%}"
    )
    if (warning := cut_off_warning(summary, decoding.max_new_tokens)) is not None:
        log(warning)
    return row


def _oracle(cfg: SweepConfig, lm: Engine, problems: list[Problem], run_dir: Path, log: Log) -> FrontierPoint | None:
    """The best-of-N shortest-correct oracle on these problems: the baseline (decoded as the sweep is) and the plain
    prompt's samples (drawn like the ``sampled`` pair source, into the same cache, when
    ``cfg.oracle_samples`` > 0; else whatever samples that cache already holds for them)."""
    decoding = cfg.decoding()
    baseline = evaluate(lm, problems, Condition("baseline", template("baseline")), decoding, run_dir / "runs")
    samples: dict[str, list[EvalRecord]] = {}
    for index in range(cfg.oracle_samples):
        sampling = replace(decoding, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=index)
        condition = Condition("sample", template("baseline"))
        for record in evaluate(lm, problems, condition, sampling, run_dir / "pairs"):
            samples.setdefault(record.id, []).append(record)
    if not samples:
        samples = cached_samples(run_dir / "pairs", problems)
    if not problems or any(p.id not in samples for p in problems):
        return None
    n = min(len(v) for v in samples.values())
    log(f"best-of-{n + 1} shortest-correct oracle from {n} sample(s) per problem and the baseline trace")
    return shortest_correct_oracle(baseline, samples, label=f"best-of-{n + 1} oracle")


def cached_samples(pairs_dir: Path, problems: list[Problem]) -> dict[str, list[EvalRecord]]:
    """id -> the plain prompt's sampled records already cached for these problems (``sample-*.jsonl``)."""
    wanted = {p.id: p for p in problems}
    found: dict[str, list[EvalRecord]] = {}
    for path in sorted(pairs_dir.glob("sample-*.jsonl")):
        for record in read_records(JsonlStore(path, unique_key=record_key)):
            problem = wanted.get(record.id)
            if problem is not None and record.matches(problem):
                found.setdefault(record.id, []).append(record)
    return found


def frontier_summary(
    rows: list[dict[str, Any]], cfg: SweepConfig, n: int, oracle: FrontierPoint | None, path: Path, title: str
) -> dict[str, Any]:
    """Per method (vector x layer x positions x schedule) on these problems: its points and the tokens
    saved at accuracy within 2 points of the baseline; the plot with the references on the same axes."""
    decoding = cfg.decoding().describe()
    same = [
        r for r in rows
        if (r["dataset"], r["split"], r["offset"], r["n"]) == (cfg.dataset, cfg.split, cfg.offset, n)
        and r.get("decoding", "greedy") == decoding
        and len(r.get("correct", ())) == n
    ]  # fmt: skip
    base_row = next((r for r in same if r["relative_strength"] == 0 and r["template"] == "baseline"), None)
    if base_row is None:
        return {"methods": {}, "references": {}}
    base = FrontierPoint("baseline", tuple(base_row["correct"]), tuple(base_row["tokens"]))
    references = {
        r["template"]: FrontierPoint(r["template"], tuple(r["correct"]), tuple(r["tokens"]))
        for r in same
        if r["relative_strength"] == 0
    }
    if oracle is not None:
        references[oracle.label] = oracle
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in same:
        if r["relative_strength"] != 0:
            label = f"{Path(r['vector']).stem} L{r['layer']} {r['positions']} {r.get('schedule') or 'constant'}"
            groups.setdefault(label, []).append(r)
    methods = {}
    for label, items in groups.items():
        points = [FrontierPoint(f"s{r['relative_strength']:g}", tuple(r["correct"]), tuple(r["tokens"])) for r in items]
        methods[label] = {
            **asdict(tokens_saved(base, points)),
            "points": [{"relative_strength": r["relative_strength"], "accuracy": r["accuracy"],
                        "mean_tokens": r["mean_tokens"]} for r in items],
        }  # fmt: skip
    plot_frontier(
        {
            k: [(p["mean_tokens"], p["accuracy"], f"{p['relative_strength']:g}") for p in v["points"]]
            for k, v in methods.items()
        },
        {k: (p.mean_tokens, p.accuracy) for k, p in references.items()},
        path,
        title + " (labels: strength / residual norm)",
    )
    ref_json = {k: {"accuracy": p.accuracy, "mean_tokens": p.mean_tokens} for k, p in references.items()}
    return {"methods": methods, "references": ref_json}


_ROW_KEY = (
    "engine",
    "vector",
    "template",
    "schedule",
    "dataset",
    "split",
    "offset",
    "n",
    "layer",
    "relative_strength",
    "positions",
    "decoding",
)


def _merge_rows(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import json

    old: list[dict[str, Any]] = []
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("rows", [])
        except (ValueError, AttributeError):
            old = []
    old = [{"decoding": "greedy", **r} for r in old]  # rows written before sweeps could sample were greedy
    fresh = {tuple(r.get(k) for k in _ROW_KEY) for r in new}
    return [r for r in old if tuple(r.get(k) for k in _ROW_KEY) not in fresh] + new


def _plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["layer"] < 0:
            continue  # a prompt baseline: on the frontier plot
        label = f"{Path(row.get('vector', '')).stem} L{row['layer']} {row['positions']}"
        if row.get("decoding", "greedy") != "greedy":
            label += f" ({row['decoding']})"  # a sampled sweep's points are a curve of their own
        groups.setdefault(label, []).append(row)
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
