"""Small target networks for the guidance experiment, trained from scratch: a vanilla (Elman, tanh) RNN
and a small pre-norm causal transformer. Each maps token ids [B, T] to ``(logits [B, T, V], states)``,
``states`` the output of every layer ([B, T, width] each): what the guidance loss aligns."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class RnnLM(nn.Module):
    """Embedding, ``layers`` stacked single-layer tanh RNNs, a linear head (the paper's "untrainable" RNN)."""

    def __init__(self, vocab: int, width: int, layers: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnns = nn.ModuleList(nn.RNN(width, width, batch_first=True, nonlinearity="tanh") for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(ids)
        states = []
        for rnn in self.rnns:
            x, _ = rnn(x)
            states.append(x)
        return self.head(x), states


class TransformerLM(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-norm causal blocks (4 heads, 4x MLP), a head."""

    def __init__(self, vocab: int, width: int, layers: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        t = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        states = []
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
            states.append(x)
        return self.head(self.norm(x)), states


TARGETS: dict[str, Callable[[int, int, int, int], nn.Module]] = {"rnn": RnnLM, "transformer": TransformerLM}
