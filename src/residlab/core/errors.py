"""One error type for everything a user can get wrong, always carrying a hint on how to fix it."""

from __future__ import annotations


class ResidlabError(Exception):
    """An error the user can act on: ``message`` says what is wrong, ``hint`` how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message if not hint else f"{message}\nHint: {hint}")
        self.message = message
        self.hint = hint


class ModelMismatchError(ResidlabError):
    """A vector, file or cache was made for a different model than the one it is used with."""


class UnknownArchitectureError(ResidlabError):
    """The model's architecture has no entry in the architecture map."""
