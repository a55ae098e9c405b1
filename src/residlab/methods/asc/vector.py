"""ASC stage 2: the concise-minus-verbose vector, read with both traces under the same prompt.

:func:`extract_vector` turns pairs into a vector at every layer; :func:`build_concise_vector` is the
stage as ``compress`` runs it (pairs, extraction, optionally a second source's direction projected
out); :func:`steering_vector` is the one-layer unit vector compress saves, with its provenance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from residlab.analyses.lens import top_tokens
from residlab.core.errors import ResidlabError
from residlab.core.io import write_json
from residlab.core.types import Log
from residlab.data import load_problems
from residlab.engines import Engine
from residlab.methods.asc import prompts
from residlab.methods.asc.config import CompressConfig
from residlab.methods.asc.pairs import PairStats, TracePair, compress_pairs
from residlab.models.lm import LanguageModel
from residlab.recipes.extraction import ExtractionResult, contrast_vector
from residlab.vectors.steering_vector import SteeringVector

LENS_TOKENS = 12  # how many promoted and suppressed tokens the report lists


def extract_vector(
    lm: LanguageModel,
    pairs: Sequence[TracePair],
    *,
    read: str = "mean",
    method: str = "mean_diff",
    batch_size: int = 4,
    template: str = prompts.VERBOSE,
    progress: bool = True,
) -> ExtractionResult:
    """Mean (or first principal component) of concise - verbose residuals at every layer (``progress``:
    bars over the forward passes, as the trace generation shows them).

    Sign convention: the vector points from verbose towards concise, so a positive strength is meant
    to shorten outputs (measured, not assumed: see the sweep).
    """
    use_chat = lm.has_chat_template
    heads = _heads(lm, pairs, template)
    source = pairs[0].concise_source if pairs else ""
    return contrast_vector(
        lm,
        heads,
        [p.concise for p in pairs],
        [p.verbose for p in pairs],
        read=read,
        method=method,
        batch_size=batch_size,
        add_special_tokens=not use_chat,
        progress=progress,
        source=f"ASC: {method} of concise - verbose, read={read}, {len(pairs)} pairs ({source} concise traces)",
        info={
            "n_pairs": len(pairs),
            "sign": "concise - verbose",
            "concise_source": source,
            "mean_concise_tokens": sum(p.concise_tokens for p in pairs) / max(1, len(pairs)),
            "mean_verbose_tokens": sum(p.verbose_tokens for p in pairs) / max(1, len(pairs)),
        },
    )


def _heads(lm: LanguageModel, pairs: Sequence[TracePair], template: str) -> list[str]:
    """Each pair's prompt as the model reads it (the chat template applied where the model has one)."""
    return [lm.format_prompt(template.format(question=p.question), chat=lm.has_chat_template) for p in pairs]


EXTRACTION_CACHE_VERSION = 1  # bump when the extraction's computation changes: older cache files are then unused


def _extraction_key(lm: LanguageModel, pairs: Sequence[TracePair], read: str, method: str, template: str) -> str:
    """The inputs as rendered (so a changed chat template or system prompt misses the cache), the model's
    name and dtype, and how the vector is read."""
    settings = [EXTRACTION_CACHE_VERSION, lm.name, str(lm.dtype), read, method, not lm.has_chat_template]
    digest = hashlib.sha256(json.dumps(settings).encode())
    for pair, head in zip(pairs, _heads(lm, pairs, template), strict=True):
        digest.update(json.dumps([head, asdict(pair)], sort_keys=True).encode())
    return digest.hexdigest()[:12]


def _per_layer(values: dict[str, float | None]) -> dict[int, float]:
    """A saved per-layer statistic (JSON keys are strings; NaN was written as null)."""
    return {int(k): float("nan") if v is None else float(v) for k, v in values.items()}


def cached_extraction(
    lm: LanguageModel,
    pairs: Sequence[TracePair],
    cache_dir: Path,
    *,
    read: str = "mean",
    method: str = "mean_diff",
    batch_size: int = 4,
    template: str = prompts.VERBOSE,
    log: Log = print,
    progress: bool = True,
) -> ExtractionResult:
    """:func:`extract_vector`, saved under ``cache_dir`` and reused by a rerun on the same model (name and
    dtype), pairs, read and method: the extraction is minutes of forward passes on a CPU, and a resumed
    ``compress`` should not pay them again. A cache file that cannot be read is recomputed."""
    key = _extraction_key(lm, pairs, read, method, template)
    vector_path, stats_path = cache_dir / f"extraction-{key}.safetensors", cache_dir / f"extraction-{key}.json"
    if vector_path.is_file() and stats_path.is_file():
        try:
            stats = json.loads(stats_path.read_text())
            extraction = ExtractionResult(
                SteeringVector.load(vector_path),
                _per_layer(stats["separation"]),
                _per_layer(stats["residual_norm"]),
                stats["read"],
                stats["method"],
                int(stats["n_pairs"]),
            )
            log(f"      reusing the extraction in {vector_path.name}")
            return extraction
        except (ResidlabError, ValueError, KeyError, TypeError, AttributeError) as err:
            log(f"      the cached extraction {vector_path.name} is unreadable ({err}); extracting again")
    extraction = extract_vector(
        lm, pairs, read=read, method=method, batch_size=batch_size, template=template, progress=progress
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    extraction.vector.save(vector_path)
    fields = ("separation", "residual_norm", "read", "method", "n_pairs")
    write_json(stats_path, {name: getattr(extraction, name) for name in fields})  # last: marks the pair complete
    return extraction


@dataclass(frozen=True)
class ProjectedOut:
    """The second pair source whose direction was removed from the vector."""

    source: str
    pairs: PairStats
    cosine_per_layer: dict[str, float]  # of the vector before projection with the removed direction


@dataclass(frozen=True)
class ConciseVector:
    """The stage's result: the extraction (its vector already projected, if asked) and the pairs behind it."""

    extraction: ExtractionResult
    pairs: PairStats
    projected_out: ProjectedOut | None = None

    @property
    def vector(self) -> SteeringVector:
        """The vector at every layer, as extracted (not normalised)."""
        return self.extraction.vector


def build_concise_vector(
    lm: LanguageModel, cfg: CompressConfig, pairs_dir: Path, engine: Engine | None = None, log: Log = print
) -> ConciseVector:
    """Pairs from ``cfg.pairs`` train problems of ``cfg.pairs_dataset`` (cached under ``pairs_dir``), the
    concise-minus-verbose vector at every layer, minus ``cfg.project_out``'s direction if set."""
    problems = load_problems(cfg.pairs_dataset, "train", data_dir=cfg.data_dir, limit=cfg.pairs)
    log(f"[1/4] traces for {len(problems)} {cfg.pairs_dataset} train problems (concise: {cfg.pair_source})")
    pairs, stats = compress_pairs(lm, cfg, cfg.pair_source, problems, pairs_dir, engine)
    log(
        f"      {stats.n_pairs} pairs kept; verbose {stats.mean_verbose_tokens:.0f} tokens, "
        f"concise {stats.mean_concise_tokens:.0f} tokens on average"
    )
    log(f"[2/4] extracting the vector ({cfg.method}, read={cfg.read}) at all {lm.num_layers} layers")
    batch_size = max(1, cfg.batch_size // 2)
    extraction = cached_extraction(
        lm, pairs, pairs_dir, read=cfg.read, method=cfg.method, batch_size=batch_size, log=log
    )
    if not cfg.project_out:
        return ConciseVector(extraction, stats)
    log(f"      and the control direction to project out (concise source {cfg.project_out})")
    control_pairs, control_stats = compress_pairs(lm, cfg, cfg.project_out, problems, pairs_dir, engine)
    control = cached_extraction(
        lm, control_pairs, pairs_dir, read=cfg.read, method=cfg.method, batch_size=batch_size, log=log
    ).vector
    vector = extraction.vector.project_out(control)
    cosines = {str(k): round(extraction.vector.cosine(control, k), 4) for k in vector.layers}
    projected = replace(vector, info={**vector.info, "projected_out": cfg.project_out})
    return ConciseVector(
        replace(extraction, vector=projected), stats, ProjectedOut(cfg.project_out, control_stats, cosines)
    )


def rescaled(direction: torch.Tensor, norm: float) -> torch.Tensor:
    """``direction`` (float32) scaled to length ``norm``."""
    direction = direction.float()
    return direction / direction.norm().clamp_min(1e-12) * norm


def steering_vector(
    concise: ConciseVector,
    layer: int,
    strength: float,
    positions: str,
    kl_bound_strength: float | None,
    also_layers: tuple[int, ...] = (),
    *,
    trained: bool = False,
) -> SteeringVector:
    """The vector that compress saves, recording how strongly and where to apply it: the unit vector at
    ``layer`` and, at each of ``also_layers``, a direction sized so that ``strength`` x it is that layer's
    steering delta. A ``trained`` vector's directions are its deltas (their ratios kept); an extracted
    one's are rescaled to the same relative strength as ``layer`` (x each layer's residual norm)."""
    raw = concise.vector
    residual = concise.extraction.residual_norm
    main = raw.directions[layer].norm()
    directions = {}
    for k in (layer, *also_layers):
        direction = raw.directions[k].float()
        if float(direction.norm()) == 0.0:
            raise ResidlabError(f"the direction at layer {k} is zero.", hint="leave that layer out.")
        if trained:
            directions[k] = direction / main
        else:
            directions[k] = rescaled(direction, residual[k] / residual[layer])
    return replace(
        raw,
        directions=directions,
        position_rule=positions,
        info={
            **raw.info,
            "normalized": not also_layers,  # unit at every layer (else at ``layer`` only)
            "strength": strength,
            "layer": layer,
            "also_layers": list(also_layers),
            "raw_norm": raw.norm(layer),
            "residual_norm": residual[layer],
            "kl_bound_strength": kl_bound_strength,
        },
    )


@dataclass(frozen=True)
class VectorLens:
    """The tokens whose logits a vector raises and lowers most, read through the unembedding."""

    promotes: list[str]
    suppresses: list[str]


def vector_lens(lm: LanguageModel, vector: SteeringVector, k: int = LENS_TOKENS) -> VectorLens:
    """The logit lens of ``vector`` (at its main layer): its ``k`` most promoted and most suppressed tokens."""
    layer = vector.info.get("layer", vector.layers[0])  # compress's main layer when it steers several
    return VectorLens(
        promotes=[t for t, _ in top_tokens(lm, vector, k=k, layer=layer)],
        suppresses=[t for t, _ in top_tokens(lm, vector, k=k, layer=layer, largest=False)],
    )
