"""What ``residlab compress`` decides: one frozen :class:`CompressConfig`, built by the CLI (or a script).

Nothing downstream changes it: the layer and strength it leaves open (``None``) are resolved into a
separate value (``methods.asc.steering``), and the report records the config with those filled in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from residlab.core.errors import ResidlabError
from residlab.evaluation.runner import Decoding
from residlab.interventions.schedules import strength_schedule
from residlab.models.registry import DEFAULT_MODEL

# Strengths found by the KL bound instead of given: the paper's bound, and the same bound on
# mean-free logit changes (tighter, still valid).
STRENGTH_MODES = ("auto", "auto-centred")

Strength = float | str | None  # x residual norm at the layer (unit vector), a STRENGTH_MODES entry, or None


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``residlab compress`` decides.

    The defaults are the method that did best on GSM8K train problems (``learned``: -2.5 points, -19.6%
    tokens on train problems 1000-1039, where the mean difference lost 7.5 points) at a size that keeps
    ``make demo`` within 15 minutes on a 2-core CPU without AVX-512: 16 pairs (on the same train problems
    as good as 32: -2.5 points, -20.8% tokens), 30 test problems, the baseline and ASC only, no KL bound
    (``benchmarks/results/asc_methods.md``, ``benchmarks/results/demo_noavx512.md``, README "ASC II").
    """

    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # torch: bfloat16 where the CPU runs it natively, else float32
    engine: str = "auto"  # generation engine for traces and evaluation (auto: llamacpp when installed)
    device: str = "cpu"  # torch: auto, cpu, cuda, cuda:N or mps
    device_map: str | None = None  # torch: accelerate's "auto" spreads a large model over every GPU
    n_gpu_layers: int | None = None  # llama.cpp: layers on the GPU (None: all where the build has GPU support)
    pairs_dataset: str = "gsm8k"  # calibration problems come from its train split
    pairs: int = 16
    pair_source: str = "reference"
    pair_samples: int = 4  # samples per problem for pair_source="sampled"
    max_concise_ratio: float | None = None  # if set, drop pairs whose concise trace exceeds this x the verbose one
    keep: str = "concise_correct"  # the reference side is always right; the model is right on ~30%
    project_out: str | None = None  # a second pair source whose direction is removed from the vector
    teacher_url: str | None = None
    teacher_model: str = "default"
    teacher_concurrency: int = 8  # requests kept in flight to the teacher endpoint (its server batches them)
    pairs_file: str | None = None
    read: str = "mean"
    method: str = "learned"  # an extraction aggregator, prompt-contrast or learned (methods.asc.vector_methods)
    learn_steps: int = 12  # --method learned: optimiser steps
    learn_kl_eps: float = 0.05  # --method learned: per-token KL (nats) on general text before the hinge bites
    learn_window: int = 96  # --method learned: first completion tokens of each trace the preference loss sees
    learn_pairs_per_step: int = 1  # --method learned: pairs per optimiser step
    adaptive: str | None = None  # every steered condition under this strength schedule (asc -> asc-<adaptive>)
    layer: int | None = None  # None: the model's tuned layer (registry), else the best separated middle layer
    also_layers: tuple[int, ...] = ()  # more layers steered with ``layer``, each at the same relative strength
    # (x its own residual norm, along its own direction); --method learned trains them all jointly
    strength: Strength = None  # x residual norm at the layer (unit vector); "auto" = KL bound,
    # "auto-centred" = the same bound on mean-free logit changes (tighter, still valid);
    # None: the model's tuned strength (registry), else 0.25
    eps: float = 1e-3
    positions: str = "prompt_last+generated"
    eval_dataset: str = "gsm8k"
    eval_split: str = "test"
    eval_offset: int = 0  # skip this many eval problems (a train-split evaluation must skip the pair problems)
    limit: int = 30
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy; reasoning (R1-style) models are sampled (the ASC paper: 0.7, top-p 0.9)
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    data_dir: str | None = None
    work_dir: str = "residlab-out"
    conditions: tuple[str, ...] = ("baseline", "asc")
    calibration_states: int = 16  # train prompts for the KL bound's constants (and as many held out)
    kl_bound: bool = False  # run the KL-bound calibration (always run when strength is a KL-bound mode)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, kept in report.json

    def __post_init__(self) -> None:
        self.decoding()  # bad sampling settings fail here, before any trace is generated
        if self.project_out is not None and self.project_out == self.pair_source:
            raise ResidlabError(
                f"--project-out {self.project_out} is the pair source itself: nothing would be left of the vector.",
                hint="project out a different source, e.g. --pair-source reference --project-out sampled.",
            )
        if self.adaptive is not None:
            strength_schedule(self.adaptive)  # an unknown name fails here, before any work
        if self.teacher_concurrency < 1:
            raise ResidlabError(
                f"--teacher-concurrency {self.teacher_concurrency} is below 1.",
                hint="keep at least one request in flight (default 8).",
            )
        if isinstance(self.strength, str) and self.strength not in STRENGTH_MODES:
            raise ResidlabError(
                f"unknown strength {self.strength!r}.", hint="give a number (x residual norm), auto or auto-centred."
            )
        if any(k < 0 for k in self.also_layers):
            raise ResidlabError(
                f"--also-layers {','.join(map(str, self.also_layers))} has a negative layer.",
                hint="give block indices from 0, e.g. --also-layers 8,12.",
            )
        if len(set(self.also_layers)) != len(self.also_layers):
            raise ResidlabError(
                f"--also-layers {','.join(map(str, self.also_layers))} repeats a layer.",
                hint="name each extra layer once.",
            )
        if self.layer in self.also_layers:
            raise ResidlabError(
                f"--also-layers {','.join(map(str, self.also_layers))} includes the steering layer {self.layer}.",
                hint="list only the layers steered besides --layer.",
            )
        # The same checkpoint and vector whatever order the layers are named in.
        object.__setattr__(self, "also_layers", tuple(sorted(self.also_layers)))
        if self.also_layers and (isinstance(self.strength, str) or self.kl_bound):
            raise ResidlabError(
                "the KL bound (--kl-bound, --strength auto) is calibrated for one layer; --also-layers steers several.",
                hint="give a number for --strength (x each layer's residual norm) or leave --also-layers out.",
            )
        if self.method == "learned" and isinstance(self.strength, str):
            raise ResidlabError(
                "--method learned (the default) trains from a given strength, not a KL-bound mode.",
                hint="give a number for --strength (x residual norm), leave it out (the tuned strength), or use "
                "--method mean_diff with --strength auto.",
            )

    @property
    def runs_kl_bound(self) -> bool:
        """Whether the KL-bound stage runs: asked for, or needed to pick the strength.

        The bound is loose by ~10^6 on these models (the measured KL at the tuned strength is far below it), so
        by default it is not spent: it costs minutes of float32 double differentiation on a CPU."""
        return self.kl_bound or isinstance(self.strength, str)

    @property
    def condition_names(self) -> tuple[str, ...]:
        """The conditions that run: ``conditions``, each steered one made adaptive when ``adaptive`` is set."""
        if self.adaptive is None:
            return self.conditions
        return tuple(
            f"asc-{self.adaptive}{name[3:]}" if name == "asc" or name.startswith("asc+") else name
            for name in self.conditions
        )

    def decoding(self) -> Decoding:
        """How the verbose traces and every evaluated condition are decoded."""
        return Decoding(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.batch_size)

    def run_dir(self) -> Path:
        """Where this run's vectors, records and report go."""
        return run_dir_for(self.work_dir, self.model)


def run_dir_for(work_dir: str | Path, model: str) -> Path:
    """``<work_dir>/<model name>``: a packaged name or hub id as is, a local path by its last part."""
    name = Path(model).stem if model.startswith((".", "/", "~")) or Path(model).exists() else model.replace("/", "_")
    return Path(work_dir) / name


def parse_strength(text: str | None) -> Strength:
    """A ``--strength`` option: None, a KL-bound mode, or a number (x residual norm at the layer)."""
    if text is None or text in STRENGTH_MODES:
        return text
    try:
        return float(text)
    except ValueError:
        raise ResidlabError(
            f"cannot read the strength {text!r}.", hint="give a number (x residual norm), auto or auto-centred."
        ) from None
