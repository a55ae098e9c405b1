"""How ``compress`` makes its vector (``--method``): a small registry of typed methods.

- an extraction aggregator (``mean_diff``, the default; ``pca``, ``logistic``): concise - verbose
  trace states (``methods.asc.vector``);
- ``prompt-contrast``: concise-instruction - plain-instruction prompt states, no traces generated
  (``methods.asc.prompt_contrast``);
- ``learned``: the mean difference at the steering layer as the start, trained by the contrastive
  energy loss with a KL hinge on general text (``recipes.learned_vector``).

A method has a ``build`` stage (before the steering layer is chosen: a vector at every layer and the
per-layer separation that chooses it) and an optional ``refine`` stage (after: the learned vector
trains only at the chosen layer, from the chosen strength).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from residlab.core.errors import ResidlabError
from residlab.core.types import Log
from residlab.data import load_problems
from residlab.data.corpus import load_corpus
from residlab.engines import Engine
from residlab.methods.asc import prompts
from residlab.methods.asc.config import CompressConfig
from residlab.methods.asc.pairs import compress_pairs
from residlab.methods.asc.prompt_contrast import prompt_contrast_vector
from residlab.methods.asc.vector import ConciseVector, build_concise_vector, rescaled
from residlab.models.lm import LanguageModel
from residlab.recipes.extraction import AGGREGATORS
from residlab.recipes.learned_vector import LearnSettings, PreferencePair, learn_vector

Build = Callable[[LanguageModel, CompressConfig, Path, "Engine | None", Log], ConciseVector]
# (lm, cfg, the built vector, steering layer, its absolute strength, run dir, engine, log) -> refined vector
Refine = Callable[[LanguageModel, CompressConfig, ConciseVector, int, float, Path, "Engine | None", Log], ConciseVector]


@dataclass(frozen=True)
class VectorMethod:
    """One way to make the compress vector (see the module docstring)."""

    name: str
    build: Build
    refine: Refine | None = None
    needs_traces: bool = True  # whether it generates train traces (prompt-contrast does not)


def build_prompt_contrast(
    lm: LanguageModel, cfg: CompressConfig, pairs_dir: Path, engine: Engine | None, log: Log
) -> ConciseVector:
    """The prompt-contrast vector from ``cfg.pairs`` train questions (no generation)."""
    problems = load_problems(cfg.pairs_dataset, "train", data_dir=cfg.data_dir, limit=cfg.pairs)
    log(f"[1/4] prompt pairs for {len(problems)} {cfg.pairs_dataset} train questions (concise vs plain instruction)")
    log(f"[2/4] reading both prompts' states at all {lm.num_layers} layers (no traces generated)")
    extraction, stats = prompt_contrast_vector(lm, problems, batch_size=max(1, cfg.batch_size // 2))
    return ConciseVector(extraction, stats)


def mean_diff_start(
    lm: LanguageModel, cfg: CompressConfig, pairs_dir: Path, engine: Engine | None, log: Log
) -> ConciseVector:
    """The mean-difference vector the learned method starts from (the trace pairs it also trains on)."""
    return build_concise_vector(lm, replace(cfg, method="mean_diff"), pairs_dir, engine, log)


def refine_learned(
    lm: LanguageModel,
    cfg: CompressConfig,
    concise: ConciseVector,
    layer: int,
    strength: float,
    run_dir: Path,
    engine: Engine | None,
    log: Log,
) -> ConciseVector:
    """Train the vector at ``layer`` (and ``cfg.also_layers``, jointly) from the mean difference scaled to
    ``strength`` (the others to the same relative strength); the result's norm at ``layer`` is its
    strength. Resumes from ``run_dir/learned``."""
    problems = load_problems(cfg.pairs_dataset, "train", data_dir=cfg.data_dir, limit=cfg.pairs)
    pairs, _ = compress_pairs(lm, cfg, cfg.pair_source, problems, run_dir / "pairs", engine)
    chat = lm.has_chat_template
    preference = [
        PreferencePair(lm.format_prompt(prompts.VERBOSE.format(question=p.question), chat=chat), p.concise, p.verbose)
        for p in pairs
    ]
    general = [t for t in load_corpus("wiki").split("train") if t.strip()][: max(8, cfg.learn_steps)]
    # Each layer starts from its own mean difference at the same relative strength (x its residual norm).
    relative = strength / concise.extraction.residual_norm[layer]
    layers = (layer, *cfg.also_layers)
    residual = concise.extraction.residual_norm
    initial = torch.stack([rescaled(concise.vector.directions[k], relative * residual[k]) for k in layers])
    settings = LearnSettings(
        layer=layer,
        also_layers=tuple(cfg.also_layers),
        steps=cfg.learn_steps,
        kl_eps=cfg.learn_kl_eps,
        max_completion_tokens=cfg.learn_window,
        pairs_per_step=cfg.learn_pairs_per_step,
    )
    where = f"layer {layer}" if not cfg.also_layers else f"layers {', '.join(map(str, layers))} (jointly)"
    log(
        f"      learning the vector at {where} from the mean difference at strength {strength:.3g}: "
        f"{settings.steps} steps x {settings.pairs_per_step} of {len(preference)} pairs (first "
        f"{settings.max_completion_tokens} tokens) and {len(general)} wiki texts"
    )
    start = initial[0] if not cfg.also_layers else initial
    learned = learn_vector(lm, preference, general, start, settings, checkpoint_dir=run_dir / "learned", log=log)
    trained = learned.vector.reshape(len(layers), -1)
    directions = {**concise.vector.directions, **{k: trained[i] for i, k in enumerate(layers)}}
    info = {
        **concise.vector.info,
        "method": "learned",
        "learned_layer": layer,
        "learned_layers": list(layers),
        "learned_initial_strength": strength,
        "learned_norm": float(trained[0].norm()),
        "learned_cosine_to_mean_diff": learned.cosine_to_initial,
        "learned_settings": {k: v for k, v in vars(settings).items()},
        "learned_history": learned.history,
    }
    vector = replace(concise.vector, directions=directions, info=info, source=concise.vector.source + " (learned)")
    return replace(concise, extraction=replace(concise.extraction, vector=vector, method="learned"))


VECTOR_METHODS: dict[str, VectorMethod] = {
    "prompt-contrast": VectorMethod("prompt-contrast", build_prompt_contrast, needs_traces=False),
    "learned": VectorMethod("learned", mean_diff_start, refine=refine_learned),
}


def vector_method(name: str) -> VectorMethod:
    """The method called ``name``: a :data:`VECTOR_METHODS` entry or an extraction aggregator."""
    if name in VECTOR_METHODS:
        return VECTOR_METHODS[name]
    if name in AGGREGATORS:
        return VectorMethod(name, build_concise_vector)
    raise ResidlabError(
        f"unknown vector method {name!r}.", hint=f"use one of {', '.join([*AGGREGATORS, *VECTOR_METHODS])}."
    )
