"""What an intervention needs of a model: a small protocol, so interventions never import the models.

:class:`~residlab.models.lm.LanguageModel` satisfies it; so can any wrapper that exposes the decoder
stack, its blocks, a forward tracker and a way to find a block's parts (through an architecture map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from residlab.interventions.tracking import ForwardTracker


class HookTarget(Protocol):
    """The model side of recording, steering and editing."""

    @property
    def tracker(self) -> ForwardTracker: ...

    @property
    def decoder(self) -> torch.nn.Module: ...

    @property
    def blocks(self) -> Sequence[torch.nn.Module]: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def check_layer(self, layer: int) -> int:
        """``layer`` as a non-negative block index, or a clear error."""
        ...

    def block_part(self, layer: int, part: str) -> torch.nn.Module:
        """Block ``layer`` itself (``part == ""``) or one of its parts by architecture-map field name
        (``attn``, ``mlp``, ``mlp_down``, ``input_norm``...); a clear error if the family has none."""
        ...

    def model_part(self, part: str) -> torch.nn.Module:
        """A module of the whole model by architecture-map field name (``final_norm``, ``unembed``)."""
        ...
