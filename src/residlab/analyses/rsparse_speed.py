"""CPU wall-clock of R-Sparse's sparse + low-rank path against the dense layer, one token at a time.

The masked products of :meth:`SparseLowRank.apply` do the dense work and only zero inputs, so they
are never faster. :func:`sparse_matvec` really skips it, for one token (decoding, where the per-token
channel choice can be exploited): the kept channels' weight rows are read and summed with
``torch.nn.functional.embedding_bag`` (a gather-accumulate over rows of ``W^T`` stored [in, out], no
copy), and the low-rank part is two small dense products ``(U_r S_r) (V_r^T x_rest)``. The channel
scores and the top-k are part of the timed path. Timing uses ``torch.utils.benchmark.Timer`` (median
of blocked runs) at a fixed thread count. A batch of tokens (prefill) has a different mask per token,
so the gathered path does not batch; there the layer stays dense.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from residlab.analyses.rsparse_factors import Budget, SparseLowRank


@dataclass(frozen=True)
class PreparedPath:
    """What the timed sparse path reads: ``W^T`` rows, column norms and the rank-``r`` factors."""

    weight_t: torch.Tensor  # [in, out], contiguous
    column_norms: torch.Tensor
    left: torch.Tensor  # [out, r]
    right: torch.Tensor  # [r, in]
    bias: torch.Tensor | None
    channels: int

    @classmethod
    def of(cls, factors: SparseLowRank, budget: Budget) -> PreparedPath:
        r = budget.rank
        return cls(
            factors.weight.T.contiguous(),
            factors.column_norms,
            factors.left[:, :r].contiguous(),
            factors.right[:r].contiguous(),
            factors.bias,
            budget.channels,
        )


def sparse_matvec(path: PreparedPath, x: torch.Tensor) -> torch.Tensor:
    """The sparse + low-rank output for one token ``x`` [in], skipping the dropped channels' weights."""
    y = torch.zeros(path.weight_t.shape[1], dtype=x.dtype)
    rest = x
    if path.channels:
        kept = torch.topk(x.abs() * path.column_norms, path.channels, sorted=False).indices
        y = F.embedding_bag(kept.unsqueeze(0), path.weight_t, per_sample_weights=x[kept].unsqueeze(0), mode="sum")[0]
        rest = x.index_fill(0, kept, 0.0)
    if path.right.shape[0]:
        y = y + path.left @ (path.right @ rest)
    return y if path.bias is None else y + path.bias


@dataclass(frozen=True)
class SpeedRow:
    """Median time (microseconds) of one linear layer for one token, dense and sparse + low-rank."""

    linear: str
    in_features: int
    out_features: int
    alpha: float
    channels: int
    rank: int
    macs_kept: float
    dense_us: float
    sparse_us: float
    variant: str = ""  # which alpha choice it times (set by the analysis)

    @property
    def speedup(self) -> float:
        return self.dense_us / self.sparse_us if self.sparse_us else float("nan")


def _median_us(fn: Callable[[], object], threads: int, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    return (
        1e6
        * Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        .blocked_autorange(min_run_time=min_run_time)
        .median
    )


@torch.inference_mode()
def time_linears(
    factors: Mapping[str, SparseLowRank],
    inputs: Mapping[str, torch.Tensor],
    budgets: Mapping[str, Budget],
    *,
    threads: int = 1,
    min_run_time: float = 0.2,
) -> list[SpeedRow]:
    """Per linear layer (name -> factors, one token's real input [in], budget): dense vs sparse path."""
    rows = []
    for name, f in factors.items():
        x, budget = inputs[name].float().contiguous(), budgets[name]
        path = PreparedPath.of(f, budget)
        weight, bias = f.weight.contiguous(), f.bias
        dense = _median_us(functools.partial(F.linear, x, weight, bias), threads, min_run_time)
        sparse = _median_us(functools.partial(sparse_matvec, path, x), threads, min_run_time)
        rows.append(
            SpeedRow(
                name,
                f.in_features,
                f.out_features,
                budget.alpha,
                budget.channels,
                budget.rank,
                budget.kept_macs / budget.dense_macs,
                dense,
                sparse,
            )
        )
    return rows
