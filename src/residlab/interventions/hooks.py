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


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a module was called with (positionally or as ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


class HookSet:
    """Handles registered by one intervention; ``remove_all`` is idempotent and exception-safe."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        """``fn(module, args, output)``, or ``fn(module, args, kwargs, output)`` with ``with_kwargs``."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def pre_forward(self, module: torch.nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def observe(self, module: torch.nn.Module, reads: str, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(hidden)`` with the module's hidden input (``reads == "input"``) or output on every call."""
        if reads == "output":
            self.forward(module, lambda mod, args, output: fn(split_output(output)[0]))
        else:
            self.pre_forward(module, lambda mod, args, kwargs: fn(first_input(args, kwargs)))

    def replace(self, module: torch.nn.Module, reads: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the module's hidden input (before it runs) or output with ``transform(hidden)``."""
        if reads == "output":

            def hook(mod: torch.nn.Module, args: tuple, output: Any) -> Any:
                hidden, rest = split_output(output)
                return join_output(transform(hidden), rest)

            self.forward(module, hook)
            return

        def pre_hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (transform(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

        self.pre_forward(module, pre_hook)

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)
