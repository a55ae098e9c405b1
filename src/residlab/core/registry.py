"""Small registries of typed callables: a name the user typed, or the callable itself, to the callable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from residlab.core.errors import ResidlabError

Entry = TypeVar("Entry", bound=Callable[..., object])


def lookup(table: Mapping[str, Entry], key: str | Entry, *, what: str, extend_hint: str = "") -> Entry:
    """``key`` itself when it is a callable, else ``table[key]``, or an error naming what ``table`` has
    (``extend_hint`` says how a user adds their own)."""
    if callable(key):
        return key
    found = table.get(key)
    if found is None:
        hint = f"use one of {', '.join(table)}" + (f", or {extend_hint}" if extend_hint else "") + "."
        raise ResidlabError(f"unknown {what} {key!r}.", hint=hint)
    return found
