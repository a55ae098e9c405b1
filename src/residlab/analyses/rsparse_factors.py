"""R-Sparse's sparse + low-rank form of one linear layer (Zhang et al. 2025, arXiv 2504.19449).

For a linear layer ``y = W x + b`` (``W``: [out, in]) and an input ``x``, each input channel ``j`` is
scored ``|x_j| * ||W[:, j]||`` (how much it can move the output). At sparsity ``s`` (the fraction of
the dense multiply-accumulates *saved*) and split ``alpha``:

- the ``channels = round(in * (1 - s) * alpha)`` best-scoring channels go through ``W`` exactly;
- the rest go through the rank-``r`` truncated SVD ``U_r S_r V_r^T`` of ``W``, with ``r`` the largest
  rank that fits the remaining budget: ``r = floor((in * out * (1 - s) - channels * out) / (in + out))``;

``y ~ W (x * m) + U_r S_r V_r^T (x * (1 - m)) + b``. ``alpha = 1`` is pure top-k activation sparsity,
``alpha = 0`` pure low-rank. The mask is chosen per token (top-k of the scores, ties to the lower
channel); the paper calibrates one threshold per layer on a sample instead, which keeps the same
fraction on average rather than exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from residlab.core.errors import ResidlabError


@dataclass(frozen=True)
class Budget:
    """How one ``in -> out`` linear layer is split at sparsity ``sparsity`` and split ``alpha``."""

    in_features: int
    out_features: int
    sparsity: float
    alpha: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ResidlabError(
                f"sparsity must lie in [0, 1) and alpha in [0, 1]; got {self.sparsity}, {self.alpha}.",
                hint="pass e.g. --sparsity 0.5 --alpha 0.9.",
            )

    @property
    def channels(self) -> int:
        """Input channels kept exact."""
        return min(self.in_features, round(self.in_features * (1 - self.sparsity) * self.alpha))

    @property
    def rank(self) -> int:
        """Rank of the low-rank part (what the kept channels leave of the budget)."""
        i, o = self.in_features, self.out_features
        spare = i * o * (1 - self.sparsity) - self.channels * o
        return max(0, min(min(i, o), math.floor(spare / (i + o) + 1e-9)))

    @property
    def dense_macs(self) -> int:
        return self.in_features * self.out_features

    @property
    def kept_macs(self) -> int:
        """Multiply-accumulates per token of the sparse + low-rank form (the scoring's ``in`` not counted)."""
        return self.channels * self.out_features + self.rank * (self.in_features + self.out_features)


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The [out, in] weight of an ``nn.Linear`` or of transformers' ``Conv1D`` (stored [in, out])."""
    weight = torch.as_tensor(module.weight).detach().float()
    return weight if isinstance(module, torch.nn.Linear) else weight.T


def block_linears(block: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every linear layer inside a decoder block (``nn.Linear`` or ``Conv1D``)."""
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            yield name, module


class SparseLowRank:
    """The offline pieces of one linear layer: its weight, column norms and SVD factors up to ``max_rank``."""

    def __init__(self, module: torch.nn.Module, max_rank: int) -> None:
        weight = linear_weight(module)
        self.weight = weight  # [out, in] float32 (a view of the model's own when already float32)
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else bias.detach().float()
        self.column_norms = weight.norm(dim=0)
        self.out_features, self.in_features = weight.shape
        rank = min(max_rank, *weight.shape)
        if rank > 0:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            self.left = (u[:, :rank] * s[:rank]).contiguous()  # U_r S_r, [out, r]
            self.right = vh[:rank].contiguous()  # V_r^T, [r, in]
        else:
            self.left = weight.new_zeros(self.out_features, 0)
            self.right = weight.new_zeros(0, self.in_features)

    def budget(self, sparsity: float, alpha: float) -> Budget:
        return Budget(self.in_features, self.out_features, sparsity, alpha)

    def keep_mask(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """[..., in] bool: the ``channels`` highest-scoring input channels of each row of ``x``."""
        mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        if channels > 0:
            score = x.abs() * self.column_norms
            mask.scatter_(-1, torch.topk(score, channels, dim=-1, sorted=False).indices, True)
        return mask

    def apply(self, x: torch.Tensor, budget: Budget) -> torch.Tensor:
        """``W (x * m) + U_r S_r V_r^T (x * (1 - m)) + b`` for inputs ``x`` [..., in] (float32 out).

        Computed with dense masked products (the quality path); :mod:`residlab.analyses.rsparse_speed`
        times a path that really skips the work."""
        x = x.float()
        if budget.rank > self.left.shape[1]:
            raise ResidlabError(
                f"rank {budget.rank} exceeds the {self.left.shape[1]} factors kept.",
                hint="factorise with a larger max_rank.",
            )
        mask = self.keep_mask(x, budget.channels)
        y = (x * mask) @ self.weight.T
        if budget.rank:
            rest = x.masked_fill(mask, 0)
            y = y + (rest @ self.right[: budget.rank].T) @ self.left[:, : budget.rank].T
        return y if self.bias is None else y + self.bias

    def relative_error(self, x: torch.Tensor, budget: Budget) -> float:
        """``||y_approx - y|| / ||y||`` over the rows of ``x`` (bias excluded from both)."""
        exact = x.float() @ self.weight.T
        approx = self.apply(x, budget) - (0 if self.bias is None else self.bias)
        return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


def max_rank_needed(in_features: int, out_features: int, sparsity: float) -> int:
    """The largest rank any alpha asks for at ``sparsity`` (the pure low-rank one, alpha = 0)."""
    return Budget(in_features, out_features, sparsity, 0.0).rank
