"""The steps the CLI and the benchmark share: harvest a corpus split, evaluate an SAE on held-out text,
and measure how much the early stop of a harvest saves against a full forward pass."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from residlab.data.corpus import Corpus
from residlab.saes.activations import (
    ActivationStore,
    ChunkRunner,
    HarvestSpec,
    HarvestStats,
    harvest,
    site_activations,
    token_windows,
)
from residlab.saes.base import SparseAutoencoder
from residlab.saes.evaluation import SAEEvalResult, downstream_ce, reconstruction_metrics, topk_jaccard

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class HarvestRequest:
    """Which activations to harvest, from which corpus, how much."""

    layer: int
    site: str
    context_len: int
    max_tokens: int
    eval_fraction: float = 0.05
    store_dtype: str = "float32"
    batch_size: int = 16
    shard_tokens: int = 65_536


def harvest_split(
    lm: LanguageModel,
    corpus: Corpus,
    split: str,
    request: HarvestRequest,
    root: str | Path,
    *,
    progress: bool = True,
    runner: ChunkRunner | None = None,
) -> tuple[ActivationStore, HarvestStats]:
    """Harvest ``split`` (train or eval) of ``corpus`` at the requested site (resuming a stored harvest);
    ``runner`` computes the chunks elsewhere (a Ray pool), with the same result."""
    spec = HarvestSpec(
        model=lm.name,
        layer=lm.check_layer(request.layer),
        site=request.site,
        corpus=corpus.name,
        corpus_fingerprint=f"{corpus.fingerprint}-{request.eval_fraction}",
        split=split,
        context_len=request.context_len,
        store_dtype=request.store_dtype,
    )
    return harvest(
        lm,
        corpus.split(split, eval_fraction=request.eval_fraction),
        spec,
        root,
        max_tokens=request.max_tokens,
        batch_size=request.batch_size,
        shard_tokens=request.shard_tokens,
        progress=progress,
        runner=runner,
    )


def eval_windows(lm: LanguageModel, corpus: Corpus, request: HarvestRequest, limit: int) -> list[list[int]]:
    """The first ``limit`` held-out token windows (for the spliced cross-entropy)."""
    docs = corpus.split("eval", eval_fraction=request.eval_fraction)
    return token_windows(lm, docs, request.context_len)[:limit]


def evaluate_sae(
    lm: LanguageModel,
    sae: SparseAutoencoder,
    eval_store: ActivationStore,
    windows: list[list[int]],
    mean_activation: torch.Tensor,
    *,
    sample: bool | None = None,
    train_tokens: int = 0,
    history: list[dict[str, float]] | None = None,
    batch_size: int = 8,
) -> SAEEvalResult:
    """Reconstruction metrics on the held-out store, spliced CE on held-out windows, and (vSAE) the
    Jaccard stability of the selected latents."""
    sae = sae.to(lm.device).eval()
    acts = eval_store.activations().to(lm.device)
    with torch.no_grad():
        metrics = reconstruction_metrics(sae, acts, sample=sample)
        downstream = downstream_ce(lm, sae, windows, mean_activation, sample=sample, batch_size=batch_size)
        stability = topk_jaccard(sae, acts[:4096].cpu()) if sae.cfg.arch == "vsae" else {}
    return SAEEvalResult(
        model=lm.name,
        layer=sae.cfg.hook.layer,
        site=sae.cfg.hook.site,
        arch=sae.cfg.arch,
        sample=sample if sae.cfg.arch == "vsae" else None,
        width=sae.cfg.d_sae,
        k=sae.cfg.k,
        train_tokens=train_tokens,
        metrics=metrics,
        downstream=downstream,
        stability=stability,
        history=list(history or []),
    )


@torch.no_grad()
def alive_over(
    sae: SparseAutoencoder, stores: list[ActivationStore], *, sample: bool | None = None, batch_size: int = 4096
) -> dict[str, float | int]:
    """The fraction of latents that fire at least once over all tokens of ``stores`` together.

    A wider window than one held-out store: rare latents (density ~1e-5) need a few hundred thousand
    tokens to show that they are alive, which is why the field counts dead latents over a long window.
    """
    if not stores:
        raise ValueError("alive_over needs at least one activation store")
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    tokens = 0
    device = next(sae.parameters()).device
    for store in stores:
        acts = store.activations()
        for start in range(0, acts.shape[0], batch_size):
            z = sae(acts[start : start + batch_size].to(device).float(), sample=sample).z
            fired |= (z != 0).any(dim=0).cpu()
        tokens += acts.shape[0]
    return {"tokens": tokens, "alive_fraction": float(fired.double().mean())}


@torch.inference_mode()
def stop_ratio(lm: LanguageModel, windows: list[list[int]], layer: int, site: str, *, batch_size: int = 8) -> dict:
    """Seconds for the harvest's stopped pass against a full forward pass over the same batches."""
    batches = [lm.pad(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    site_activations(lm, batches[0], layer, site)  # warm-up
    lm.forward(batches[0])
    started = time.perf_counter()
    for batch in batches:
        site_activations(lm, batch, layer, site)
    stopped = time.perf_counter() - started
    started = time.perf_counter()
    for batch in batches:
        lm.forward(batch)
    full = time.perf_counter() - started
    return {
        "layer": layer,
        "num_layers": lm.num_layers,
        "stopped_s": stopped,
        "full_forward_s": full,
        "ratio": stopped / full,
        "batches": len(batches),
    }
