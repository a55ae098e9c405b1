"""Linear CKA: the biased and the debiased (unbiased-HSIC) estimators, one-shot and accumulated over minibatches.

For two representations ``X`` [n, d1] and ``Y`` [n, d2] of the same ``n`` examples, with Gram
matrices ``K = X X^T`` and ``L = Y Y^T``:

- **biased** (Kornblith et al. 2019): ``HSIC_b(K, L) = <H K H, H L H>_F / (n - 1)^2`` with the
  centring matrix ``H``; ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. It equals
  ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` for column-centred ``X_c``, ``Y_c``, and is
  inflated at small ``n`` (two independent Gaussian sets give ~0.2 at n = 32, d = 64).
- **debiased** (Song et al. 2012's unbiased HSIC, used for CKA by Nguyen et al. 2021): ``HSIC_u(K, L) =
  <U(K), U(L)>_F / (n (n - 3))`` where ``U`` is the *U-centring* of Szekely & Rizzo (diagonal
  zeroed, then ``U_ij = K_ij - r_i / (n-2) - r_j / (n-2) + s / ((n-1)(n-2))`` off the diagonal, ``r`` the
  row sums and ``s`` the total), which makes the inner product an unbiased estimate of HSIC. Needs
  ``n >= 4``; on independent data it is ~0 at any ``n``.
- **minibatch** (Nguyen et al. 2021): HSIC terms are summed over minibatches (each an estimate from
  its own ``n`` examples) and CKA is formed from the sums, so any number of tokens fits in memory;
  with the unbiased estimator the sum is an unbiased estimate of the HSIC of the whole population.

:class:`CkaAccumulator` does this for many layers of two models at once: every pair ``(i, j)`` of a
layer of the first and a layer of the second set is one inner product of flattened centred Grams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from residlab.core.errors import ResidlabError

ESTIMATORS = ("biased", "debiased")


def _as_2d(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    return x.to(dtype)


def gram(x: torch.Tensor) -> torch.Tensor:
    """The linear-kernel Gram matrix ``X X^T`` of ``x`` [n, ...] (flattened per example)."""
    x = _as_2d(x)
    return x @ x.T


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """``H K H``: double centring of a Gram matrix (the biased estimator's centring)."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def u_center_gram(k: torch.Tensor) -> torch.Tensor:
    """U-centring (Szekely & Rizzo 2014) of a Gram matrix: ``<U(K), U(L)> / (n (n - 3))`` is unbiased HSIC."""
    n = k.shape[0]
    if n < 4:
        raise ResidlabError(f"the debiased CKA needs at least 4 examples, got {n}.", hint="pass more tokens.")
    k = k - torch.diag_embed(torch.diagonal(k))
    rows = k.sum(0)
    u = k - rows.unsqueeze(0) / (n - 2) - rows.unsqueeze(1) / (n - 2) + k.sum() / ((n - 1) * (n - 2))
    return u - torch.diag_embed(torch.diagonal(u))


def _centred(k: torch.Tensor, debiased: bool) -> tuple[torch.Tensor, float]:
    """The centred Gram and the HSIC normaliser of one estimator."""
    n = k.shape[0]
    if debiased:
        return u_center_gram(k), float(n * (n - 3))
    if n < 2:
        raise ResidlabError(f"CKA needs at least 2 examples, got {n}.", hint="pass more tokens.")
    return center_gram(k), float((n - 1) ** 2)


def hsic(k: torch.Tensor, l_gram: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """HSIC of two Gram matrices with the biased or the unbiased estimator."""
    kc, norm = _centred(k, debiased)
    lc, _ = _centred(l_gram, debiased)
    return (kc * lc).sum() / norm


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """Linear CKA of ``x`` [n, d1] and ``y`` [n, d2] (rows = the same examples); differentiable.

    The biased form is computed in feature space (``O(n d1 d2)``, no ``n x n`` matrix); the debiased
    form needs the Grams. Computed in float64 unless an input requires a gradient (then in that input's dtype).
    """
    if x.shape[0] != y.shape[0]:
        raise ResidlabError(
            f"CKA compares the same examples: got {x.shape[0]} and {y.shape[0]} rows.",
            hint="pass two representations of the same inputs.",
        )
    # float64 for measurements; in a training loss, the dtype of the tensor being trained (float32 is fast)
    dtype = x.dtype if x.requires_grad else y.dtype if y.requires_grad else torch.float64
    x, y = _as_2d(x, dtype), _as_2d(y, dtype)
    if debiased:
        k, l_gram = x @ x.T, y @ y.T
        xy, xx, yy = hsic(k, l_gram, debiased=True), hsic(k, k, debiased=True), hsic(l_gram, l_gram, debiased=True)
    else:
        xc, yc = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
        xy = (yc.T @ xc).square().sum()
        xx, yy = (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum()
    denom = (xx * yy).clamp(min=0).sqrt()
    return xy / denom.clamp(min=torch.finfo(denom.dtype).tiny)


@dataclass(frozen=True)
class CkaMatrices:
    """Layer x layer CKA (rows = the first set's layers, columns = the second's) of both estimators."""

    biased: list[list[float]]
    debiased: list[list[float]]
    num_examples: int
    num_minibatches: int


class CkaAccumulator:
    """Sums HSIC terms over minibatches for every pair (layer i of set A, layer j of set B).

    ``add(a, b)`` takes ``a`` [layers_a, n, d_a] and ``b`` [layers_b, n, d_b] for one minibatch of the
    same ``n`` examples (``n >= 4``). ``same=True`` declares ``b`` to be ``a`` (a within-model map),
    which halves the work. Sums are float64, so batching does not change the result beyond rounding.
    """

    def __init__(self, layers_a: int, layers_b: int) -> None:
        self.shape = (layers_a, layers_b)
        self.cross = {e: torch.zeros(layers_a, layers_b, dtype=torch.float64) for e in ESTIMATORS}
        self.self_a = {e: torch.zeros(layers_a, dtype=torch.float64) for e in ESTIMATORS}
        self.self_b = {e: torch.zeros(layers_b, dtype=torch.float64) for e in ESTIMATORS}
        self.num_examples = 0
        self.num_minibatches = 0

    @staticmethod
    def _flat_centred(states: torch.Tensor, debiased: bool) -> tuple[torch.Tensor, float]:
        grams = [_centred(gram(layer), debiased) for layer in states]
        return torch.stack([g.flatten() for g, _ in grams]), grams[0][1]

    def add(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Add one minibatch (``b=None``: the second set is the first)."""
        n = a.shape[1]
        if (b is not None and b.shape[1] != n) or n < 4:
            raise ResidlabError(
                f"a CKA minibatch needs the same n >= 4 examples on both sides, got {n}"
                f"{'' if b is None else f' and {b.shape[1]}'}.",
                hint="pass a minibatch of at least 4 tokens.",
            )
        if a.shape[0] != self.shape[0] or (b if b is not None else a).shape[0] != self.shape[1]:
            raise ResidlabError("a CKA minibatch has the wrong number of layers.", hint="pass every layer each time.")
        for estimator in ESTIMATORS:
            debiased = estimator == "debiased"
            fa, norm = self._flat_centred(a, debiased)
            fb = fa if b is None else self._flat_centred(b, debiased)[0]
            self.cross[estimator] += (fa @ fb.T) / norm
            self.self_a[estimator] += fa.square().sum(1) / norm
            self.self_b[estimator] += fb.square().sum(1) / norm
        self.num_examples += n
        self.num_minibatches += 1

    def result(self) -> CkaMatrices:
        """CKA of the accumulated sums (HSIC sums divided by the number of minibatches cancel out)."""
        if not self.num_minibatches:
            raise ResidlabError("no minibatch was added: nothing to compare.", hint="pass longer or more texts.")
        out = {}
        for e in ESTIMATORS:
            denom = (self.self_a[e].unsqueeze(1) * self.self_b[e].unsqueeze(0)).clamp(min=0).sqrt()
            out[e] = (self.cross[e] / denom.clamp(min=1e-300)).tolist()
        return CkaMatrices(out["biased"], out["debiased"], self.num_examples, self.num_minibatches)


def even_stride_mapping(num_target: int, num_guide: int) -> list[int]:
    """The guide layer of each target layer, spread evenly (the guidance paper's mapping).

    Target layer ``l`` of ``num_target`` maps to guide layer ``round((l + 1) * num_guide / num_target) - 1``,
    so the last layers meet and the stride is ``num_guide / num_target``.
    """
    if num_target < 1 or num_guide < 1:
        raise ResidlabError("both networks need at least one layer.", hint="check the layer counts.")
    return [max(0, min(num_guide - 1, round((i + 1) * num_guide / num_target) - 1)) for i in range(num_target)]


def mapped_values(matrix: Sequence[Sequence[float]], mapping: Sequence[int]) -> list[float]:
    """``matrix[i][mapping[i]]`` for every row ``i``."""
    return [float(matrix[i][j]) for i, j in enumerate(mapping)]
