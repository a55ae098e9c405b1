"""The requests the server accepts, as validated types (pydantic), and the limits it enforces.

Every field a client sends is checked before any work starts: wrong types, negative or zero token
budgets, non-finite numbers and unknown roles are answered 422 with the field and the reason, never a
dropped connection or a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from residlab.serving.steering import SteeringRequest


@dataclass(frozen=True)
class ServerLimits:
    """What one request may cost. ``max_new_tokens`` also caps ``max_tokens`` at the model's context;
    ``max_body_bytes`` is checked before the body is read, ``max_prompt_tokens`` after rendering."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
    default_new_tokens: int = 256
    request_timeout_s: float = 600.0  # a generation still running after this is answered 504
    max_queue: int = 256  # requests waiting beyond the running batch; more are answered 503

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_new_tokens", "default_new_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # a request that names no budget must never be refused for the server's own default
        object.__setattr__(self, "default_new_tokens", min(self.default_new_tokens, self.max_new_tokens))
        if not self.request_timeout_s > 0:
            raise ValueError("request_timeout_s must be positive")


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


class GenerationRequest(BaseModel):
    """The fields chat and plain completions share (other OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    # strict: a boolean or a string is not a token count (lax mode would read `true` as 1)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    # null means the default, as OpenAI's clients send it
    temperature: float | None = Field(default=None, ge=0.0, le=10.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63, strict=True)
    stream: bool = Field(default=False, strict=True)
    # residlab's own: per-request steering by vector name (OpenAI clients send it through extra_body)
    steering: SteeringRequest | None = None

    def token_budget(self, limits: ServerLimits, room: int | None = None) -> int:
        """The requested number of new tokens (``max_completion_tokens`` wins); when none is asked for,
        the server's default, shortened to the ``room`` the model's context leaves."""
        asked = self.max_completion_tokens or self.max_tokens
        if asked is not None:
            return asked
        return max(1, min(limits.default_new_tokens, room)) if room is not None else limits.default_new_tokens


class ChatCompletionRequest(GenerationRequest):
    """OpenAI's chat-completions request (``POST /v1/chat/completions``), the subset residlab serves."""

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    """OpenAI's (legacy) completions request (``POST /v1/completions``): one plain-text prompt, which
    the model continues as it is (no chat template)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("one prompt per request (send several requests: the server batches them)")
        if not (prompt if isinstance(prompt, str) else prompt[0]):
            raise ValueError("the prompt is empty")
        return prompt

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
