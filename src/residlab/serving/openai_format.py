"""OpenAI's response shapes: whole completions, streamed chunks (server-sent events), and text deltas.

Streamed text is decoded incrementally (:class:`TextDeltas`): each chunk carries what the tokens so far
add to the text, held back while the last token ends mid-character, so the chunks concatenate to
exactly the text a non-streamed request returns.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Route:
    """One generation endpoint: the object names its replies use and whether prompts are chats."""

    path: str
    chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def new_id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


CHAT = Route("/v1/chat/completions", chat=True)
COMPLETIONS = Route("/v1/completions", chat=False)
ROUTES = {CHAT.path: CHAT, "/chat/completions": CHAT, COMPLETIONS.path: COMPLETIONS, "/completions": COMPLETIONS}


def finish_reason(hit_limit: bool) -> str:
    return "length" if hit_limit else "stop"


def completion(route: Route, model: str, text: str, hit_limit: bool, prompt_tokens: int, tokens: int) -> dict:
    """A whole (non-streamed) reply."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(hit_limit), "logprobs": None}
    if route.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": route.new_id(),
        "object": route.object,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
    }


def chunk(route: Route, ident: str, model: str, text: str | None, finish: str | None = None, role: bool = False):
    """One streamed chunk: a text delta (chat: ``delta.content``; completions: ``text``), the
    assistant's role (first chat chunk), or the final chunk with its ``finish_reason``."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if route.chat:
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": ident, "object": route.chunk_object, "created": int(time.time()), "model": model, "choices": [choice]}


def sse(payload: dict[str, Any] | str) -> bytes:
    """A server-sent event carrying ``payload`` (JSON, or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


class TextDeltas:
    """Turns a growing list of token ids into text deltas that concatenate to their full decoding."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add(self, tokens: list[int]) -> str:
        """The new text ``tokens`` add; empty while it ends in a partial character (or would rewrite
        text already sent)."""
        self.token_ids.extend(tokens)
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        """What is left at the end; afterwards ``sent`` is the full text when the decodings were prefixes."""
        text = self._text()
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
