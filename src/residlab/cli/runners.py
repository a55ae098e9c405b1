"""Which evaluator a command runs its problems with: this process, or a Ray pool (``--ray``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from residlab.engines import EngineSpec
from residlab.evaluation.runner import Evaluator, evaluate


@contextlib.contextmanager
def evaluator_for(spec: EngineSpec, ray: str | None, actors: int | None = None) -> Iterator[Evaluator]:
    """:func:`~residlab.evaluation.runner.evaluate` without ``ray``; else a
    :class:`~residlab.distributed.ray_pool.RayEvaluator` on that cluster, closed on exit."""
    if ray is None:
        yield evaluate
        return
    from residlab.distributed.ray_pool import RayEvaluator, RayOptions

    with RayEvaluator(spec, RayOptions(address=ray, actors=actors)) as pool:
        yield pool
