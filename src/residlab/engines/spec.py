"""``EngineSpec``: how to open an engine, as a small picklable value (what a Ray actor receives to
open its own engine, and what the CLI builds from --model/--engine/--dtype/--device...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from residlab.engines.base import Engine
    from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class EngineSpec:
    """Everything :func:`~residlab.engines.open_engine` needs besides an already loaded model.

    ``device`` and ``device_map`` are resolved where the engine opens (``auto`` on a Ray actor
    means that actor's GPU), so one spec serves every node of a cluster.
    """

    model: str
    engine: str = "auto"
    dtype: str | None = "auto"
    device: str = "cpu"
    device_map: str | None = None
    n_gpu_layers: int | None = None
    threads: int | None = None

    def open(self, lm: LanguageModel | None = None) -> Engine:
        """Open the engine (reusing ``lm`` for the torch engine when given)."""
        from residlab.engines import open_engine

        return open_engine(
            self.model,
            self.engine,
            dtype=self.dtype,
            lm=lm,
            threads=self.threads,
            device=self.device,
            device_map=self.device_map,
            n_gpu_layers=self.n_gpu_layers,
        )

    @property
    def uses_gpu(self) -> bool:
        """Whether the engine asks for a GPU (a Ray actor then reserves one)."""
        return self.device.startswith("cuda") or self.device_map is not None or bool(self.n_gpu_layers)
