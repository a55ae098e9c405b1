"""Sparse autoencoders on the residual stream: architectures (TopK, BatchTopK, variational TopK) behind a registry,
an activation store that harvests one layer from a corpus, training, evaluation, SAELens-format files,
steering-vector decomposition and static dashboards."""

from __future__ import annotations

from residlab.saes.base import ARCHITECTURES, HookPoint, SAEConfig, SparseAutoencoder, architecture, build_sae
from residlab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from residlab.saes.topk import TopKConfig, TopKSAE
from residlab.saes.vsae import VariationalSAE, VSAEConfig

__all__ = [
    "ARCHITECTURES",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "HookPoint",
    "SAEConfig",
    "SparseAutoencoder",
    "TopKConfig",
    "TopKSAE",
    "VSAEConfig",
    "VariationalSAE",
    "architecture",
    "build_sae",
]
