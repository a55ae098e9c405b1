from __future__ import annotations

import functools
import os

import pytest
import torch

from residlab.testing import TINY_FAMILIES, tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


@functools.cache
def _cached_tiny(family: str):
    return tiny_model(family)


@pytest.fixture(params=TINY_FAMILIES)
def lm(request):
    """A tiny random model of each mapped family (shared across tests; interventions leave no trace)."""
    return _cached_tiny(request.param)


@pytest.fixture
def qwen():
    return _cached_tiny("qwen2")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Tests never touch the user's cache unless they opt in (the real-model tests do).
    if "RESIDLAB_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("RESIDLAB_CACHE", str(tmp_path / "cache"))


PROMPTS = ["Natalia sold clips to 48 of her friends.", "How many?", "Weng earns $12 an hour for babysitting today."]


def random_vector(lm, layers, seed=0, scale=3.0):
    from residlab import SteeringVector

    g = torch.Generator().manual_seed(seed)
    return SteeringVector.from_layers(
        {layer: torch.randn(lm.hidden_size, generator=g) * scale for layer in layers}, model=lm, source="test"
    )


def hook_keys(lm) -> set:
    """Every hook on the model's modules (transformers installs some of its own, permanently)."""
    return {
        (name, kind, key)
        for name, module in lm.model.named_modules()
        for kind, hooks in (("fwd", module._forward_hooks), ("pre", module._forward_pre_hooks))
        for key in hooks
    }
