"""Hidden-dimension concentration of the residual stream (after MoHD, 2024).

For each real token at position >= ``first_position`` and each layer (block output):

- the fraction of the ``d_model`` dimensions that hold 50% / 90% of the token's L1 mass
  (the smallest ``k`` such that the ``k`` largest ``|h_j|`` sum to at least that share, divided by d);
- the Jaccard overlap of the top-``k`` dimensions (by ``|h_j|``) of consecutive tokens, with
  ``k = ceil(top_k_fraction * d)``; two random ``k``-subsets would overlap ``k / (2d - k)`` on average;
- the "shared" dimensions: those in the top-``k`` of at least half of the tokens.

A few huge "massive activation" dimensions make the 50% fraction tiny and the overlap high; the 90%
fraction shows how spread out the rest is. For reference, a vector of i.i.d. Gaussian coordinates
needs 23.9% of its dimensions for 50% of the L1 mass and 64.6% for 90% (:func:`gaussian_fraction`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from residlab.analyses.common import run_decoder, token_batches, tokenize
from residlab.analyses.means import LayerMeans, mean
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError
from residlab.core.types import Log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel


def mass_fraction(hidden: torch.Tensor, share: float) -> torch.Tensor:
    """[...] fraction of dimensions of ``hidden`` [..., d] needed to hold ``share`` of the L1 mass."""
    mags = hidden.float().abs().sort(dim=-1, descending=True).values
    total = mags.sum(dim=-1, keepdim=True)
    cumulative = mags.cumsum(dim=-1)
    # k = 1 + number of prefixes still short of the share (a zero vector needs no dimension: 0)
    short = cumulative < share * total * (1 - 1e-6)
    k = short.sum(dim=-1) + (total.squeeze(-1) > 0).long()
    return k.float() / hidden.shape[-1]


def gaussian_fraction(share: float) -> float:
    """Fraction of the dimensions of a large i.i.d. Gaussian vector that hold ``share`` of its L1 mass.

    The coordinates above ``c`` in magnitude hold ``exp(-c^2 / 2)`` of the mass and are ``erfc(c / sqrt 2)``
    of the dimensions.
    """
    c = math.sqrt(-2 * math.log(share))
    return math.erfc(c / math.sqrt(2))


def top_k_jaccard(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """[...] Jaccard overlap of the top-``k`` dimensions (by magnitude) of ``x`` and ``y`` [..., d]."""
    a = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter(-1, x.abs().topk(k, dim=-1).indices, True)
    b = torch.zeros(y.shape, dtype=torch.bool, device=y.device).scatter(-1, y.abs().topk(k, dim=-1).indices, True)
    inter = (a & b).sum(-1).float()
    return inter / (2 * k - inter)


@dataclass(frozen=True)
class DimsResult(AnalysisResult):
    """Per-layer concentration curves (index = layer) and their references."""

    json_file: ClassVar[str] = "dims.json"

    model: str
    family: str
    num_layers: int
    hidden_size: int
    num_texts: int
    num_tokens: int
    first_position: int
    frac50: list[float]  # mean over tokens of the fraction of dims holding 50% of the L1 mass
    frac90: list[float]
    top_k: int
    jaccard: list[float]  # mean top-k Jaccard overlap of consecutive tokens
    random_jaccard: float  # expected for random k-subsets: k / (2d - k)
    shared_dims: list[int]  # dims in the top-k of >= half of the tokens (count per layer)
    top_shared: list[list[int]]  # the 5 dims most often in the top-k, per layer
    gaussian_frac50: float = field(default_factory=lambda: gaussian_fraction(0.5))  # i.i.d. Gaussian reference
    gaussian_frac90: float = field(default_factory=lambda: gaussian_fraction(0.9))

    def summary(self) -> dict[str, Any]:
        """Means over layers, beside the random and Gaussian references."""
        return {
            "mean_frac50": mean(self.frac50),
            "mean_frac90": mean(self.frac90),
            "mean_jaccard": mean(self.jaccard),
            "random_jaccard": self.random_jaccard,
            "gaussian_frac50": self.gaussian_frac50,
            "gaussian_frac90": self.gaussian_frac90,
            "mean_shared_dims": mean(self.shared_dims),
        }

    @figure("dims_concentration.png")
    def _concentration_figure(self, plt: Any) -> Figure:
        layers = list(range(self.num_layers))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(layers, [100 * v for v in self.frac50], "o-", ms=3, label="50% of L1 mass")
        ax1.plot(layers, [100 * v for v in self.frac90], "s-", ms=3, label="90% of L1 mass")
        ax1.axhline(100 * self.gaussian_frac50, color="C0", ls=":", lw=1, label="Gaussian vector, 50% / 90%")
        ax1.axhline(100 * self.gaussian_frac90, color="C1", ls=":", lw=1)
        ax1.set_xlabel("layer")
        ax1.set_ylabel(f"% of the {self.hidden_size} dimensions (mean over tokens)")
        ax1.set_ylim(bottom=0)
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        ax1.set_title(f"{self.model}: dimensions holding the mass", fontsize=10)
        ax2.plot(layers, self.jaccard, "o-", ms=3, label=f"consecutive tokens, top-{self.top_k}")
        ax2.axhline(self.random_jaccard, color="gray", ls="--", label="random subsets")
        ax2.set_xlabel("layer")
        ax2.set_ylabel("Jaccard overlap")
        ax2.set_ylim(0, 1.02)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        ax2.set_title("top-k dimension overlap", fontsize=10)
        return fig


@torch.inference_mode()
def analyze_dims(
    lm: LanguageModel,
    texts: Sequence[str],
    *,
    max_tokens: int | None = 128,
    batch_size: int = 8,
    first_position: int = 1,
    top_k_fraction: float = 0.1,
    log: Log | None = None,
) -> DimsResult:
    """Hidden-dimension concentration of ``lm``'s residual stream on ``texts`` (see the module docstring)."""
    log = log or (lambda message: None)
    if not 0 < top_k_fraction <= 1:
        raise ResidlabError(f"top_k_fraction lies in (0, 1], got {top_k_fraction}.", hint="pass e.g. 0.1.")
    rows = tokenize(lm, texts, max_tokens)
    d, n_layers = lm.hidden_size, lm.num_layers
    k = max(1, math.ceil(top_k_fraction * d))
    layers = list(range(n_layers))
    frac50, frac90, jaccard = LayerMeans(n_layers), LayerMeans(n_layers), LayerMeans(n_layers)
    token_count = 0
    membership = torch.zeros(n_layers, d, dtype=torch.float64)
    for tb in token_batches(lm, rows, batch_size):
        valid = tb.valid(first_position)
        pairs = valid[:, 1:] & valid[:, :-1]
        token_count += int(valid.sum())
        with lm.record(layers, positions="all", sites=("block",)) as rec:
            run_decoder(lm, tb)
        for layer in layers:
            h = rec[layer].float()
            hv = h[valid]
            frac50.add(layer, mass_fraction(hv, 0.5))
            frac90.add(layer, mass_fraction(hv, 0.9))
            jaccard.add(layer, top_k_jaccard(h[:, 1:][pairs], h[:, :-1][pairs], k))
            top = hv.abs().topk(k, dim=-1).indices.flatten()
            membership[layer] += torch.bincount(top, minlength=d).double()
        del rec
        log(f"recorded a batch of {len(tb.rows)} texts")
    if token_count == 0:
        raise ResidlabError(
            f"no token at position >= {first_position} in any text: nothing to measure.",
            hint="pass longer texts (or a larger --max-tokens).",
        )
    share = membership / token_count
    return DimsResult(
        model=lm.name,
        family=lm.arch.family,
        num_layers=n_layers,
        hidden_size=d,
        num_texts=len(rows),
        num_tokens=token_count,
        first_position=first_position,
        frac50=frac50.means(),
        frac90=frac90.means(),
        top_k=k,
        jaccard=jaccard.means(),
        random_jaccard=k / (2 * d - k),
        shared_dims=[int((share[layer] >= 0.5).sum()) for layer in layers],
        top_shared=[share[layer].topk(min(5, d)).indices.tolist() for layer in layers],
    )
