"""What every engine shares before and after the forward passes: the prompt and generation types,
rendering a prompt through a chat template, end-of-sequence ids, and the sorted batching loop.

Model-agnostic (a tokenizer is any object with ``apply_chat_template``/``decode``), so the torch
wrapper and the llama.cpp engine both build on it without depending on each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from residlab.core.errors import ResidlabError

Prompt = str | Sequence[dict[str, str]]  # plain text, or chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True)
class Generation:
    """One completion. ``num_tokens`` counts generated tokens, the end-of-sequence token included."""

    prompt: str
    text: str
    token_ids: tuple[int, ...]
    num_tokens: int
    hit_limit: bool  # stopped by max_new_tokens rather than an end-of-sequence token
    seconds: float  # this row's share of its batch's wall-clock time
    batch_seconds: float
    batch_size: int

    def __str__(self) -> str:
        return self.text


def render_prompt(
    tokenizer: Any, prompt: Prompt, *, chat: bool | None = None, system: str | None = None, model_name: str = "model"
) -> str:
    """Render a prompt as a model sees it: through ``tokenizer``'s chat template if ``chat`` (default:
    when it has one), else as plain text. Shared by every engine, so they all see the same text."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_template if chat is None else chat
    if isinstance(prompt, str) and not use_chat:
        return prompt
    if use_chat and not has_template:
        raise ResidlabError(
            f"{model_name} has no chat template.", hint="pass chat=False (--no-chat) to use plain text."
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eos_token_ids(tokenizer: Any, *configs: Any) -> list[int]:
    """Every end-of-sequence id named by the tokenizer or any of ``configs`` (model/generation config)."""
    ids: set[int] = set()
    for source in (*configs, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return sorted(ids)


def generate_in_sorted_batches(
    texts: Sequence[str],
    encoded: Sequence[Sequence[int]],
    batch_size: int,
    decode: Callable[[list[int]], tuple[list[list[int]], list[bool]]],
    tokenizer: Any,
    progress: bool = False,
) -> list[Generation]:
    """Every engine's batching: prompts sorted by token length into batches of ``batch_size`` (less
    padding, similar lengths), ``decode(rows)`` -> (generated ids, hit_limit) per batch, timed, and the
    results returned as :class:`Generation` in the caller's order."""
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(texts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="generating", unit="prompt")
    step = max(1, batch_size)
    for start in range(0, len(order), step):
        rows = order[start : start + step]
        began = time.perf_counter()
        outputs, hit_limit = decode(rows)
        elapsed = time.perf_counter() - began
        for j, i in enumerate(rows):
            results[i] = Generation(
                prompt=texts[i],
                text=tokenizer.decode(outputs[j], skip_special_tokens=True),
                token_ids=tuple(outputs[j]),
                num_tokens=len(outputs[j]),
                hit_limit=hit_limit[j],
                seconds=elapsed / len(rows),
                batch_seconds=elapsed,
                batch_size=len(rows),
            )
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]
