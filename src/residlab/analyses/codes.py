"""Activation codes ("Neural networks behave as hash encoders", He et al. 2021, arXiv 2101.05490).

A layer's *code* for a token is the on/off pattern of its units. For a language model residlab takes
the sign pattern of the MLP pre-activation (site ``mlp_pre``: the output of the architecture map's
``mlp_in``, the gate of a gated MLP), ``code = pre > 0``, one bit per MLP unit, per token and layer.
Measured per layer over real tokens at positions >= ``first_position`` (1: the first token, an
attention sink, is left out):

- **redundancy ratio** ``(N - #unique codes) / N`` over all ``N`` tokens (train and test pooled),
  and the fraction of tokens that share their code with a token of a *different* current token id
  (a collision that no decoder of the code can resolve);
- **categorisation from codes alone**: Hamming k-nearest-neighbour (k = 9, majority vote, ties to the
  smaller token id) and a multinomial logistic regression (scikit-learn), trained on the codes of
  tokens from the train texts and tested on tokens from *other* texts, predicting the current token
  and the next token. The labels are restricted to the ``top_classes`` most frequent ids in the train
  tokens (tokens of other ids are left out of both halves; ``coverage`` says how much of the test set
  is kept), so the accuracies compare with the majority-class rate and with the model's own top-1
  next-token accuracy on the same test tokens.
- **random-code baseline**: the same probes on random codes, each unit on with its firing rate in the
  real codes (i.i.d. across tokens): what the probes reach when the code carries no information.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from residlab.analyses.common import activation_name, run_decoder, token_batches, tokenize, unembed
from residlab.analyses.means import mean
from residlab.analyses.result import AnalysisResult, figure
from residlab.core.errors import ResidlabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from residlab.models.lm import LanguageModel

LABELS = ("current", "next")


# ----------------------------------------------------------------------------------- code arithmetic


def redundancy_ratio(codes: np.ndarray) -> float:
    """``(N - #unique rows) / N`` of a [N, bits] boolean (or packed uint8) code matrix."""
    if codes.shape[0] == 0:
        return float("nan")
    unique = np.unique(np.ascontiguousarray(codes), axis=0).shape[0]
    return (codes.shape[0] - unique) / codes.shape[0]


def ambiguous_fraction(codes: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose code is shared by a row with a different label."""
    if codes.shape[0] == 0:
        return float("nan")
    _, group = np.unique(np.ascontiguousarray(codes), axis=0, return_inverse=True)
    group = group.reshape(-1)
    pairs = np.unique(np.stack([group, labels]), axis=1)  # distinct (code, label) pairs
    labels_per_code = np.bincount(pairs[0], minlength=int(group.max()) + 1)
    return float((labels_per_code[group] > 1).mean())


def hamming_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[n_queries, n_keys] Hamming distances between boolean codes: ``|a| + |b| - 2 a.b`` (exact in float32)."""
    a, b = queries.float(), keys.float()
    return a.sum(1, keepdim=True) + b.sum(1) - 2 * (a @ b.T)


def knn_predict(distances: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Majority label of each query's ``k`` nearest keys (nearest first on equal distance by key
    order; a tied vote goes to the smaller label, as scikit-learn's ``KNeighborsClassifier``)."""
    k = min(k, distances.shape[1])
    nearest = torch.sort(distances, dim=1, stable=True).indices[:, :k]
    classes, index = torch.unique(labels, return_inverse=True)  # sorted: smaller label = smaller index
    votes = torch.zeros(distances.shape[0], classes.numel()).scatter_add_(1, index[nearest], torch.ones(nearest.shape))
    return classes[votes.argmax(1)]  # argmax returns the first maximum


def logistic_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int, max_iter: int
) -> float:
    """Test accuracy of a multinomial logistic regression (L2, C = 1, lbfgs) fitted on the train codes."""
    import warnings

    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise ResidlabError(
            "the logistic-regression probe needs scikit-learn.", hint="pip install 'residlab[lab]' (or `make install`)."
        ) from None

    if len(np.unique(train_y)) < 2:
        return float((test_y == train_y[0]).mean()) if len(train_y) else float("nan")
    # One BLAS thread: on a small shared CPU more threads spin against each other (10x slower here).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped number of steps is the point
        model = LogisticRegression(max_iter=max_iter, random_state=seed).fit(train_x, train_y)
    return float((model.predict(test_x) == test_y).mean())


# ----------------------------------------------------------------------------------- collection


@dataclass
class _Tokens:
    """Codes (bit-packed per layer) and labels of the tokens of one half (train or test)."""

    packed: dict[int, list[np.ndarray]]
    current: list[np.ndarray]
    following: list[np.ndarray]  # the next token id, -1 where the text ends
    model_next: list[np.ndarray]  # the model's own top-1 next-token guess
    bits: int = 0  # units per code (the packed rows are padded to whole bytes)

    def codes(self, layer: int, bits: int) -> np.ndarray:
        return np.unpackbits(np.concatenate(self.packed[layer]), axis=1, count=bits).astype(bool)

    def labels(self, which: str) -> np.ndarray:
        return np.concatenate(self.current if which == "current" else self.following)


@torch.inference_mode()
def collect_codes(
    lm: LanguageModel,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    max_tokens: int,
    batch_size: int,
    first_position: int,
    desc: str,
    progress: bool = True,
) -> _Tokens:
    """Sign codes of ``mlp_pre`` at ``layers`` for every real token at position >= ``first_position``."""
    from tqdm.auto import tqdm

    rows = tokenize(lm, texts, max_tokens)
    out = _Tokens({layer: [] for layer in layers}, [], [], [])
    for tb in tqdm(list(token_batches(lm, rows, batch_size)), desc=desc, unit="batch", disable=not progress):
        valid = tb.valid(first_position)
        ids = tb.batch.input_ids
        following = torch.full_like(ids, -1)
        following[:, :-1] = ids[:, 1:]  # left padding: a real token's right neighbour is real
        with lm.record(layers, positions="all", sites=("mlp_pre",)) as rec:
            normed = run_decoder(lm, tb)
        for layer in layers:
            out.bits = rec[layer, "mlp_pre"].shape[-1]
            out.packed[layer].append(np.packbits((rec[layer, "mlp_pre"][valid] > 0).cpu().numpy(), axis=1))
        del rec
        out.current.append(ids[valid].cpu().numpy())
        out.following.append(following[valid].cpu().numpy())
        out.model_next.append(unembed(lm, normed[valid]).argmax(-1).cpu().numpy())
    return out


# ----------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class CodesResult(AnalysisResult):
    """Per-layer curves (index = position in ``layers``) of code redundancy and code-only accuracy."""

    json_file: ClassVar[str] = "codes.json"

    model: str
    family: str
    activation: str
    layers: list[int]
    bits: int  # MLP units per code
    train_texts: int
    test_texts: int
    train_tokens: int
    test_tokens: int
    first_position: int
    k: int
    top_classes: int
    seed: int
    redundancy: list[float]
    ambiguous: list[float]  # share of tokens whose code another token id shares
    firing_rate: list[float]  # mean fraction of units on
    coverage: dict[str, float]  # label -> fraction of test tokens whose label is a top class
    majority: dict[str, float]  # label -> accuracy of always answering the most frequent train class
    model_next_accuracy: float  # the model's own top-1 next-token accuracy on the kept test tokens
    knn: dict[str, list[float]]  # label -> per-layer accuracy
    logreg: dict[str, list[float]]
    random_knn: dict[str, list[float]]
    random_logreg: dict[str, list[float]]

    def summary(self) -> dict[str, Any]:
        """Means over layers and the best layer per probe."""
        out: dict[str, Any] = {
            "mean_redundancy": mean(self.redundancy),
            "max_redundancy": max(self.redundancy, default=float("nan")),
            "model_next_accuracy": self.model_next_accuracy,
        }
        for label in LABELS:
            for probe, curves in (("knn", self.knn), ("logreg", self.logreg), ("random_knn", self.random_knn)):
                values = curves[label]
                best = max(range(len(values)), key=values.__getitem__) if values else None
                out[f"{probe}_{label}_best"] = values[best] if best is not None else float("nan")
                out[f"{probe}_{label}_best_layer"] = self.layers[best] if best is not None else None
            out[f"majority_{label}"] = self.majority[label]
        return out

    @figure("codes_uniqueness.png")
    def _uniqueness_figure(self, plt: Any) -> Figure:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(self.layers, [100 * v for v in self.redundancy], "o-", ms=3, label="redundancy (N - unique) / N")
        ax.plot(self.layers, [100 * v for v in self.ambiguous], "s-", ms=3, label="code shared with another token id")
        ax.plot(self.layers, [100 * v for v in self.firing_rate], "^-", ms=3, label="units on (pre > 0)")
        ax.set_xlabel("layer")
        ax.set_ylabel("% of tokens / units")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        n = self.train_tokens + self.test_tokens
        ax.set_title(f"{self.model}: MLP sign codes ({self.bits} bits, {n} tokens)", fontsize=10)
        return fig

    @figure("codes_accuracy.png")
    def _accuracy_figure(self, plt: Any) -> Figure:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for ax, label in zip(axes, LABELS, strict=True):
            ax.plot(self.layers, self.knn[label], "o-", ms=3, label=f"{self.k}-NN (Hamming)")
            ax.plot(self.layers, self.logreg[label], "s-", ms=3, label="logistic regression")
            ax.plot(self.layers, self.random_knn[label], "o:", ms=2, color="grey", label="random codes, k-NN")
            ax.plot(self.layers, self.random_logreg[label], "s:", ms=2, color="silver", label="random codes, logreg")
            ax.axhline(self.majority[label], color="k", lw=0.8, ls="--", label="majority class")
            if label == "next":
                ax.axhline(self.model_next_accuracy, color="C3", lw=1, label="the model's own top-1")
            ax.set_xlabel("layer")
            ax.set_title(
                f"predict the {label} token ({self.top_classes} classes, {100 * self.coverage[label]:.0f}% of "
                "test tokens)",
                fontsize=10,
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("test accuracy (tokens from unseen texts)")
        fig.suptitle(f"{self.model}: what the MLP sign code alone tells", fontsize=10)
        return fig


# ----------------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class _Split:
    """Which train and test tokens take part for one label, and their labels."""

    train: np.ndarray  # boolean masks over the half's tokens
    test: np.ndarray
    train_y: np.ndarray
    test_y: np.ndarray


def _split(train_labels: np.ndarray, test_labels: np.ndarray, top_classes: int) -> _Split:
    ids, counts = np.unique(train_labels[train_labels >= 0], return_counts=True)
    order = np.lexsort((ids, -counts))  # most frequent first, ties to the smaller id
    top = ids[order[:top_classes]]
    train, test = np.isin(train_labels, top), np.isin(test_labels, top)
    return _Split(train, test, train_labels[train], test_labels[test])


def _probe(
    train_codes: np.ndarray, test_codes: np.ndarray, split: _Split, k: int, seed: int, max_iter: int
) -> tuple[float, float]:
    """(k-NN accuracy, logistic-regression accuracy) of one label at one layer."""
    if not split.test.any() or not split.train.any():
        return float("nan"), float("nan")
    tr, te = train_codes[split.train], test_codes[split.test]
    distances = hamming_distances(torch.from_numpy(te), torch.from_numpy(tr))
    knn = float((knn_predict(distances, torch.from_numpy(split.train_y), k).numpy() == split.test_y).mean())
    logreg = logistic_accuracy(
        tr.astype(np.float32), split.train_y, te.astype(np.float32), split.test_y, seed, max_iter
    )
    return knn, logreg


def _random_codes(rates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random codes, unit ``j`` on with probability ``rates[j]`` (i.i.d. across tokens)."""
    return rng.random((n, rates.size), dtype=np.float32) < rates


def _check(lm: LanguageModel, layers: Sequence[int] | None, k: int, top_classes: int) -> list[int]:
    if k < 1 or top_classes < 2:
        raise ResidlabError("k must be >= 1 and top_classes >= 2.", hint="pass --k 9 --top-classes 64.")
    if not lm.arch.mlp_in:
        raise ResidlabError(
            f"the architecture map of {lm.name} names no MLP input projection (mlp_in).",
            hint="use a mapped family (llama, qwen2, gemma3, gpt2, gpt_neox, ...).",
        )
    return sorted({lm.check_layer(x) for x in layers}) if layers else list(range(lm.num_layers))


def analyze_codes(
    lm: LanguageModel,
    train_texts: Sequence[str],
    test_texts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    max_tokens: int = 64,
    batch_size: int = 8,
    first_position: int = 1,
    k: int = 9,
    top_classes: int = 64,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> CodesResult:
    """Redundancy of the MLP sign codes and how well they alone identify the current / next token
    (see the module docstring). Train and test tokens come from different texts."""
    from tqdm.auto import tqdm

    chosen = _check(lm, layers, k, top_classes)
    common = {"max_tokens": max_tokens, "batch_size": batch_size, "first_position": first_position}
    train = collect_codes(lm, train_texts, chosen, desc="codes (train texts)", progress=progress, **common)
    test = collect_codes(lm, test_texts, chosen, desc="codes (test texts)", progress=progress, **common)
    bits = train.bits
    splits = {label: _split(train.labels(label), test.labels(label), top_classes) for label in LABELS}
    rng = np.random.default_rng(seed)
    curves: dict[str, dict[str, list[float]]] = {p: {x: [] for x in LABELS} for p in ("knn", "lr", "rknn", "rlr")}
    redundancy, ambiguous, firing = [], [], []
    for layer in tqdm(chosen, desc="probing codes", unit="layer", disable=not progress):
        tr, te = train.codes(layer, bits), test.codes(layer, bits)
        pooled = np.concatenate([tr, te])
        redundancy.append(redundancy_ratio(pooled))
        ambiguous.append(ambiguous_fraction(pooled, np.concatenate([train.labels("current"), test.labels("current")])))
        firing.append(float(pooled.mean()))
        rates = tr.mean(axis=0, dtype=np.float64).astype(np.float32)
        rtr, rte = _random_codes(rates, tr.shape[0], rng), _random_codes(rates, te.shape[0], rng)
        for label, split in splits.items():
            knn, lr = _probe(tr, te, split, k, seed, max_iter)
            rknn, rlr = _probe(rtr, rte, split, k, seed, max_iter)
            for key, value in (("knn", knn), ("lr", lr), ("rknn", rknn), ("rlr", rlr)):
                curves[key][label].append(value)
    model_next = np.concatenate(test.model_next)[splits["next"].test]
    return CodesResult(
        model=lm.name,
        family=lm.arch.family,
        activation=activation_name(lm),
        layers=chosen,
        bits=bits,
        train_texts=len(train_texts),
        test_texts=len(test_texts),
        train_tokens=int(train.labels("current").size),
        test_tokens=int(test.labels("current").size),
        first_position=first_position,
        k=k,
        top_classes=top_classes,
        seed=seed,
        redundancy=redundancy,
        ambiguous=ambiguous,
        firing_rate=firing,
        coverage={label: float(s.test.mean()) if s.test.size else float("nan") for label, s in splits.items()},
        majority={label: _majority(s) for label, s in splits.items()},
        model_next_accuracy=float((model_next == splits["next"].test_y).mean()) if model_next.size else float("nan"),
        knn=curves["knn"],
        logreg=curves["lr"],
        random_knn=curves["rknn"],
        random_logreg=curves["rlr"],
    )


def _majority(split: _Split) -> float:
    if not split.train_y.size or not split.test_y.size:
        return float("nan")
    ids, counts = np.unique(split.train_y, return_counts=True)
    return float((split.test_y == ids[counts.argmax()]).mean())
