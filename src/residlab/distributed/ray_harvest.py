"""SAE activation harvesting spread over a Ray :class:`~residlab.distributed.ray_pool.ActorPool`:
a :data:`~residlab.saes.activations.ChunkRunner` that hands the chunks of windows to the actors and
yields their rows in the chunks' order, so the driver fills the same shards, with the same shuffles,
as a single-process harvest (and resumes it, or is resumed by it)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from residlab.distributed.ray_pool import ActorPool
from residlab.saes.activations import ChunkRunner, HarvestSpec, Rows


def ray_chunks(pool: ActorPool, *, ahead_per_actor: int = 2) -> ChunkRunner:
    """A chunk runner on ``pool`` that keeps ``ahead_per_actor`` chunks per actor in flight."""

    def run(windows: Sequence[list[int]], chunks: Iterator[list[int]], spec: HarvestSpec) -> Iterator[Rows]:
        # each task carries only its own windows (keyed by index), not the whole corpus
        tasks = (("harvest_rows", ({i: windows[i] for i in chunk}, chunk, spec)) for chunk in chunks)
        waiting: dict[int, Rows] = {}
        wanted = 0
        for number, rows in pool.run(tasks, ahead=ahead_per_actor * max(pool.size, 1)):
            waiting[number] = rows
            while wanted in waiting:
                yield waiting.pop(wanted)
                wanted += 1

    return run
