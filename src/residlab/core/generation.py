"""What every engine shares around its forward passes: the prompt and generation types, the sampling
parameters and the one sampler, the front half of ``generate`` (prompts rendered through the chat
template, tokenised and checked), end-of-sequence ids, and the sorted batching loop.

An engine supplies only a :data:`BatchDecoder` (one batch of token ids -> generated ids); everything
else here is shared, so every engine renders, tokenises, seeds and samples the same way. Model-
agnostic: a tokenizer is any object with ``apply_chat_template``/``__call__``/``decode``.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from residlab.core.errors import ModelMismatchError, ResidlabError

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


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen and when a completion stops; identical on every engine.

    ``temperature`` 0 is greedy (the argmax, deterministic); above 0 the next token is drawn from the
    temperature-scaled distribution cut to its nucleus of probability ``top_p``, with a generator
    seeded by ``seed`` (``None``: unseeded). ``ignore_eos`` always generates ``max_new_tokens``
    tokens (speed measurements). Checked on construction, so a bad value fails before any work.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        tokens = _whole_number("max_new_tokens", self.max_new_tokens, "generate at least one token, e.g. 256.")
        if tokens < 1:
            raise ResidlabError(
                f"max_new_tokens must be at least 1, got {tokens}.", hint="generate at least one token, e.g. 256."
            )
        temperature = _finite("temperature", self.temperature, "0 is greedy; sampling usually uses 0.6-1.0.")
        if temperature < 0:
            raise ResidlabError(
                f"temperature must be >= 0, got {temperature}.", hint="0 is greedy; sampling usually uses 0.6-1.0."
            )
        top_p_hint = "1.0 keeps the whole distribution, 0.95 the likeliest tokens that make up 95% of it."
        top_p = _finite("top_p", self.top_p, top_p_hint)
        if not 0 < top_p <= 1:
            raise ResidlabError(f"top_p must be in (0, 1], got {top_p}.", hint=top_p_hint)
        seed = self.seed
        if seed is not None:
            seed_hint = "pass a non-negative integer, or no seed for an unseeded run."
            seed = _whole_number("seed", seed, seed_hint)
            if not 0 <= seed < 2**64:
                raise ResidlabError(f"seed must be in [0, 2**64), got {seed}.", hint=seed_hint)
        if not isinstance(self.ignore_eos, bool):
            raise ResidlabError(f"ignore_eos must be True or False, got {self.ignore_eos!r}.", hint="pass a boolean.")
        # Plain Python numbers from here on (numpy scalars and ints for floats are accepted above).
        for name, value in (("max_new_tokens", tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed)):
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A fresh CPU generator seeded with ``seed`` (one per ``generate`` call), or ``None`` unseeded."""
        return None if self.seed is None else torch.Generator(device="cpu").manual_seed(self.seed)


def _whole_number(name: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ResidlabError(f"{name} must be a whole number, got {value!r}.", hint=hint)
    return int(value)


def _finite(name: str, value: Any, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ResidlabError(f"{name} must be a finite number, got {value!r}.", hint=hint)
    return float(value)


def pick_next_tokens(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of ``logits`` [rows, vocab], on ``logits``' device: the argmax when
    greedy (exactly: greedy outputs do not depend on the engine's sampler), else a draw from the
    softmax at ``sampling.temperature`` restricted to the top-``sampling.top_p`` nucleus (the most
    likely token always stays in), made on the CPU with ``generator``."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs * keep)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return choice.to(logits.device)


def render_prompt(
    tokenizer: Any, prompt: Prompt, *, chat: bool | None = None, system: str | None = None, model_name: str = "model"
) -> str:
    """Render a prompt as a model sees it: through ``tokenizer``'s chat template if ``chat`` (default:
    when it has one), else as plain text. Shared by every engine, so they all see the same text."""
    use_chat = uses_chat_template(tokenizer, chat)
    if isinstance(prompt, str) and not use_chat:
        return prompt
    if use_chat and not has_chat_template(tokenizer):
        raise ResidlabError(
            f"{model_name} has no chat template.", hint="pass chat=False (--no-chat) to use plain text."
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: Any, chat: bool | None) -> bool:
    """``chat`` as asked, or (``None``) whether the tokenizer has a chat template."""
    return has_chat_template(tokenizer) if chat is None else chat


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts as the model sees them, in the caller's order: rendered ``texts`` and their token ids."""

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a text, or one chat as a list of messages) or a list of prompts -> a list of prompts."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def encode_prompts(
    tokenizer: Any,
    prompts: Prompt | Sequence[Prompt],
    *,
    chat: bool | None = None,
    system: str | None = None,
    model_name: str = "model",
    vocab_size: int | None = None,
) -> EncodedPrompts:
    """The front half of every engine's ``generate``: prompts rendered (:func:`render_prompt`) and
    tokenised. Plain text gets the tokenizer's special tokens (BOS); a chat template writes its own.
    A prompt that tokenises to nothing, or to an id at or beyond ``vocab_size``, is an error."""
    texts = tuple(
        render_prompt(tokenizer, p, chat=chat, system=system, model_name=model_name) for p in as_prompt_list(prompts)
    )
    special = not uses_chat_template(tokenizer, chat)
    token_ids = tuple(tuple(tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts)
    for i, ids in enumerate(token_ids):
        if not ids:
            raise ResidlabError(f"prompt {i} tokenised to nothing.", hint="pass non-empty prompts.")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ModelMismatchError(
                f"the tokenizer produced id {max(ids)}, beyond {model_name}'s vocabulary of {vocab_size}.",
                hint="the tokenizer does not belong to this model.",
            )
    return EncodedPrompts(texts, token_ids)


def eos_token_ids(tokenizer: Any, *configs: Any) -> list[int]:
    """Every end-of-sequence id named by the tokenizer or any of ``configs`` (model/generation config)."""
    ids: set[int] = set()
    for source in (*configs, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return sorted(ids)


@dataclass(frozen=True)
class PromptBatch:
    """Prompts decoded together: their indices in the caller's list and their token ids."""

    rows: tuple[int, ...]
    token_ids: tuple[tuple[int, ...], ...]


class DecodedBatch(NamedTuple):
    """What a batch decoder returns, one entry per row of its :class:`PromptBatch`."""

    token_ids: list[list[int]]  # generated ids, the end-of-sequence token included
    hit_limit: list[bool]  # stopped by max_new_tokens rather than an end-of-sequence token


# An engine's own part of generation: decode one batch with these sampling parameters, drawing from
# the call's generator (shared by its batches, so a seeded call is reproducible).
BatchDecoder = Callable[[PromptBatch, SamplingParams, torch.Generator | None], DecodedBatch]


def generate_batched(
    tokenizer: Any,
    prompts: Prompt | Sequence[Prompt],
    sampling: SamplingParams,
    decode: BatchDecoder,
    *,
    chat: bool | None = None,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
    model_name: str = "model",
    vocab_size: int | None = None,
) -> list[Generation]:
    """Every engine's ``generate`` around its ``decode``: the prompts encoded (:func:`encode_prompts`),
    sorted by token length into batches of ``batch_size`` (less padding, similar lengths), decoded
    with one generator seeded from ``sampling.seed``, timed, and returned in the caller's order."""
    encoded = encode_prompts(tokenizer, prompts, chat=chat, system=system, model_name=model_name, vocab_size=vocab_size)
    generator = sampling.generator()
    order = sorted(range(len(encoded.texts)), key=lambda i: len(encoded.token_ids[i]))
    results: list[Generation | None] = [None] * len(order)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="generating", unit="prompt")
    step = max(1, batch_size)
    for start in range(0, len(order), step):
        rows = tuple(order[start : start + step])
        began = time.perf_counter()
        outputs, hit_limit = decode(PromptBatch(rows, tuple(encoded.token_ids[i] for i in rows)), sampling, generator)
        elapsed = time.perf_counter() - began
        for j, i in enumerate(rows):
            results[i] = Generation(
                prompt=encoded.texts[i],
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
