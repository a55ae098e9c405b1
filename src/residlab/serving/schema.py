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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request residlab serves (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False

    def token_budget(self, limits: ServerLimits) -> int:
        """The requested number of new tokens (``max_completion_tokens`` wins), or the default."""
        asked = self.max_completion_tokens or self.max_tokens
        return limits.default_new_tokens if asked is None else asked
