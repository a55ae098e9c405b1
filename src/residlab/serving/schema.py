"""The requests the server accepts, as validated types (pydantic), and the limits it enforces.

Every field a client sends is checked before any work starts: wrong types, negative or zero token
budgets, non-finite numbers and unknown roles are answered 422 with the field and the reason, never a
dropped connection or a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class ServerLimits:
    """What one request may cost. ``max_new_tokens`` also caps ``max_tokens`` at the model's context;
    ``max_body_bytes`` is checked before the body is read, ``max_prompt_tokens`` after rendering."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
    default_new_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_new_tokens", "default_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # a request that names no budget must never be refused for the server's own default
        object.__setattr__(self, "default_new_tokens", min(self.default_new_tokens, self.max_new_tokens))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; ``content`` as a string or as OpenAI's list of text parts (joined). ``developer`` is
    OpenAI's newer name for the system role."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        """The message as chat templates take it: a plain role and text."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request residlab serves (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    # strict: a boolean or a string is not a token count (lax mode would read `true` as 1)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    # null means the default, as OpenAI's clients send it
    temperature: float | None = Field(default=None, ge=0.0, le=10.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63, strict=True)
    stream: bool = Field(default=False, strict=True)

    def token_budget(self, limits: ServerLimits, room: int | None = None) -> int:
        """The requested number of new tokens (``max_completion_tokens`` wins); when none is asked for,
        the server's default, shortened to the ``room`` the model's context leaves."""
        asked = self.max_completion_tokens or self.max_tokens
        if asked is not None:
            return asked
        return max(1, min(limits.default_new_tokens, room)) if room is not None else limits.default_new_tokens
