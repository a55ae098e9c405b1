"""The one place hooks are attached and detached: an exit always removes every hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def split_output(output: Any) -> tuple[torch.Tensor, tuple | None]:
    """A block returns a tensor or a tuple whose first item is the hidden state (it varies by version)."""
    if isinstance(output, tuple):
        return output[0], output[1:]
    return output, None


def join_output(hidden: torch.Tensor, rest: tuple | None) -> Any:
    return hidden if rest is None else (hidden, *rest)


class HookSet:
    """Handles registered by one intervention; ``remove_all`` is idempotent and exception-safe."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        """``fn(module, args, output)``, or ``fn(module, args, kwargs, output)`` with ``with_kwargs``."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def pre_forward(self, module: torch.nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)
