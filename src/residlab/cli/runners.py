"""Where a command's work runs: this process, or a Ray pool (``--ray``): evaluations and SAE harvests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from residlab.engines import EngineSpec
from residlab.evaluation.runner import Evaluator, evaluate
from residlab.saes.activations import ChunkRunner


@contextlib.contextmanager
def evaluator_for(spec: EngineSpec, ray: str | None, actors: int | None = None) -> Iterator[Evaluator]:
    """:func:`~residlab.evaluation.runner.evaluate` without ``ray``; else a
    :class:`~residlab.distributed.ray_pool.RayEvaluator` on that cluster, closed on exit."""
    if ray is None:
        yield evaluate
        return
    from residlab.distributed.ray_eval import RayEvaluator
    from residlab.distributed.ray_pool import ActorPool, RayOptions

    with ActorPool(spec, RayOptions(address=ray, actors=actors)) as pool:
        yield RayEvaluator(pool)


@contextlib.contextmanager
def chunk_runner_for(spec: EngineSpec, ray: str | None, actors: int | None = None) -> Iterator[ChunkRunner | None]:
    """``None`` (harvest here) without ``ray``; else a Ray pool's chunk runner, closed on exit."""
    if ray is None:
        yield None
        return
    from residlab.distributed.ray_harvest import ray_chunks
    from residlab.distributed.ray_pool import ActorPool, RayOptions

    with ActorPool(spec, RayOptions(address=ray, actors=actors)) as pool:
        yield ray_chunks(pool)
