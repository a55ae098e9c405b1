"""Shared pieces of the analyses: token batches, a logits-free forward pass, masks, weights, output files."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from residlab.core.errors import ResidlabError
from residlab.models.architectures import get_module
from residlab.models.lm import Batch

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

RELU_LIKE = ("relu", "relu2", "relu6", "reglu", "leaky_relu")  # exact zeros are possible


@dataclass(frozen=True)
class TokenBatch:
    """A left-padded batch of (truncated) texts and which of the caller's texts its rows are."""

    rows: tuple[int, ...]
    batch: Batch

    @property
    def positions(self) -> torch.Tensor:
        """[batch, tokens] real positions, -1 for padding."""
        mask = self.batch.attention_mask
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)

    def valid(self, first_position: int = 1) -> torch.Tensor:
        """[batch, tokens] bool: real tokens at position >= ``first_position``."""
        return self.positions >= max(first_position, 0)


def tokenize(lm: LanguageModel, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them), cut to ``max_tokens``."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ResidlabError("no texts were given.", hint="pass at least one text.")
    if max_tokens is not None and max_tokens < 2:
        raise ResidlabError(f"max_tokens must be at least 2, got {max_tokens}.", hint="pass --max-tokens 2 or more.")
    rows = [list(lm.tokenizer(t)["input_ids"]) for t in texts]
    if max_tokens is not None:
        rows = [r[:max_tokens] for r in rows]
    if not any(rows):
        raise ResidlabError("every text tokenised to nothing.", hint="pass non-empty texts.")
    return rows


def token_batches(lm: LanguageModel, rows: Sequence[Sequence[int]], batch_size: int = 8) -> Iterator[TokenBatch]:
    """Batches of the non-empty ``rows``, sorted by length to limit padding, left-padded by ``lm.pad``."""
    if batch_size < 1:
        raise ResidlabError(f"batch_size must be at least 1, got {batch_size}.", hint="pass --batch-size 1 or more.")
    order = sorted((i for i in range(len(rows)) if rows[i]), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield TokenBatch(tuple(chosen), lm.pad([list(rows[i]) for i in chosen]))


@torch.inference_mode()
def run_decoder(lm: LanguageModel, tb: TokenBatch) -> torch.Tensor:
    """Run the decoder stack (not the unembedding) without a cache; return its last hidden state.

    The decoder stack of every mapped family applies the final norm itself, so the result is
    ``final_norm(layer L-1)``, ready for :func:`unembed`. Skipping the vocabulary-sized logits of
    every token keeps memory small; hooks (records, edits, steering) see the pass as usual.
    """
    batch = tb.batch
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = lm.decoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, use_cache=False
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden


@torch.inference_mode()
def unembed(lm: LanguageModel, normed: torch.Tensor) -> torch.Tensor:
    """Logits (float32) from hidden states that already went through the final norm."""
    head = get_module(lm.model, lm.arch.unembed)
    logits = head(normed.to(lm.dtype)).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.inference_mode()
def final_norm(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's final norm applied to residual-stream states ``hidden``."""
    return get_module(lm.model, lm.arch.final_norm)(hidden.to(lm.dtype))


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``size`` each (none for ``n == 0``)."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.inference_mode()
def next_token_nll(lm: LanguageModel, tb: TokenBatch, normed: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Negative log-likelihood of each real next token (position >= 1), flattened, float64."""
    real = tb.batch.attention_mask.bool()
    pairs = real[:, :-1] & real[:, 1:]  # predicting token t+1 from t, both real
    source = normed[:, :-1][pairs]
    target = tb.batch.input_ids[:, 1:][pairs]
    losses = []
    for part in chunks(source.shape[0], chunk):
        logp = torch.log_softmax(unembed(lm, source[part]), dim=-1)
        losses.append(-logp.gather(1, target[part].unsqueeze(1)).squeeze(1).double())
    return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)


def down_matrix(lm: LanguageModel, layer: int) -> torch.Tensor:
    """The MLP down-projection of ``layer`` as a float32 [d_model, d_mlp] matrix (column i = neuron i's
    output direction), whatever the module type (``nn.Linear`` or GPT-2's transposed ``Conv1D``)."""
    module = get_module(lm.blocks[layer], lm.arch.mlp_down)
    weight = torch.as_tensor(module.weight).detach().float()
    if isinstance(module, torch.nn.Linear):
        return weight
    return weight.T  # transformers' Conv1D stores [in, out]


def activation_name(lm: LanguageModel) -> str:
    """The MLP nonlinearity's name as the model's config gives it (``"unknown"`` if it names none)."""
    config = lm.model.config
    for key in ("hidden_act", "hidden_activation", "activation_function"):
        value = getattr(config, key, None)
        if isinstance(value, str):
            return value
    return "unknown"


def is_relu_like(lm: LanguageModel) -> bool:
    """Whether the MLP activation can be exactly 0 (a ReLU variant), which makes ``a != 0`` meaningful."""
    return activation_name(lm).lower() in RELU_LIKE


def safe_name(name: str) -> str:
    """A model name usable as a folder name (a local path gives its last part)."""
    base = Path(name).name if ("/" in name or "\\" in name) and Path(name).name else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"
