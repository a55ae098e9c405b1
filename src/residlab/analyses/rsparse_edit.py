"""R-Sparse machinery on a trained model: the hooks, SVD factors, captured inputs, alpha search, CETT baseline.

The form of one layer is :mod:`residlab.analyses.rsparse_factors`. Here every linear layer of the
chosen blocks (attention's q/k/v/o, the MLP's gate/up/down: whatever ``nn.Linear``/``Conv1D`` a block
holds) is replaced, through forward hooks that exist only inside :class:`RSparseEdit`, at one
sparsity ``s`` (0.5 by default: half the multiply-accumulates kept), and perplexity on the *evaluation*
texts is compared for:

- ``dense``: the unchanged model;
- ``topk`` (alpha = 1): pure activation sparsity; ``lowrank`` (alpha = 0): pure truncated SVD;
- ``uniform``: one alpha for every layer;
- ``searched``: alpha per linear layer from a grid, each the one with the smallest relative output
  error ``||y_approx - y|| / ||y||`` on inputs captured from the *train* texts (a local, greedy search:
  the paper runs an evolutionary search on the end loss).

At equal budget against the CETT-based sparsity of ``analyze sparsity`` (Sparsing Law), on the MLP
down-projection only (the layer CETT sparsifies): ``cett_down`` drops, in every layer, the MLP
activations whose output norm ``|a_i| * ||W_down[:, i]||`` is at most the threshold that drops a
fraction ``s`` of them on the train tokens (its CETT is reported); ``topk_down`` keeps each token's
top ``(1 - s)`` by the same score; ``searched_down`` is R-Sparse with the searched alpha on the
down-projection alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from residlab.analyses.common import TokenBatch, down_matrix
from residlab.analyses.heldout import Loss, heldout_loss
from residlab.analyses.rsparse_factors import Budget, SparseLowRank, block_linears, max_rank_needed
from residlab.core.errors import ResidlabError
from residlab.interventions.hooks import HookSet

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

Key = tuple[int, str]  # (layer, the linear's name inside the block)
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


class RSparseEdit:
    """A context manager: inside it, each linear layer in ``budgets`` computes its sparse + low-rank form."""

    def __init__(self, lm: LanguageModel, factors: Mapping[Key, SparseLowRank], budgets: Mapping[Key, Budget]) -> None:
        self.modules = {key: dict(block_linears(lm.blocks[key[0]]))[key[1]] for key in budgets}
        self.factors, self.budgets = factors, budgets
        self._hooks = HookSet()

    def __enter__(self) -> RSparseEdit:
        try:
            for key, module in self.modules.items():
                self._hooks.forward(module, self._hook(key))
        except BaseException:
            self._hooks.remove_all()
            raise
        return self

    def _hook(self, key: Key) -> Any:
        factors, budget = self.factors[key], self.budgets[key]

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return factors.apply(args[0], budget).to(output.dtype)

        return hook

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove_all()


def factorise(
    lm: LanguageModel, layers: Sequence[int], sparsity: float, *, progress: bool = True
) -> dict[Key, SparseLowRank]:
    """The SVD factors (up to the rank alpha = 0 needs at ``sparsity``) of every linear of ``layers``."""
    from tqdm.auto import tqdm

    out = {}
    for layer in tqdm(layers, desc="SVD of the linear layers", unit="layer", disable=not progress):
        for name, module in block_linears(lm.blocks[layer]):
            shape = torch.as_tensor(module.weight).shape
            rank = max_rank_needed(max(shape), min(shape), sparsity)  # symmetric in in/out
            out[layer, name] = SparseLowRank(module, rank)
    if not out:
        raise ResidlabError(
            f"no linear layer found in the blocks of {lm.name}.", hint="use a mapped transformer family."
        )
    return out


@torch.inference_mode()
def capture_inputs(
    lm: LanguageModel,
    batches: Sequence[TokenBatch],
    keys: Sequence[Key],
    *,
    tokens: int,
    first_position: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[Key, torch.Tensor]:
    """About ``tokens`` rows (random real tokens at positions >= ``first_position``, the same tokens
    for every layer) of each linear layer's input, from the unchanged model on ``batches``."""
    from tqdm.auto import tqdm

    from residlab.analyses.common import run_decoder

    generator = torch.Generator().manual_seed(seed)
    per_batch = -(-tokens // max(1, len(batches)))
    rows: dict[Key, list[torch.Tensor]] = {key: [] for key in keys}
    state: dict[str, torch.Tensor] = {}
    hooks = HookSet()

    def make(key: Key) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            rows[key].append(x[state["mask"]][state["pick"]].float().clone())

        return hook

    try:
        for key in keys:
            module = dict(block_linears(lm.blocks[key[0]]))[key[1]]
            hooks.pre_forward(module, make(key))
        for tb in tqdm(batches, desc="capturing layer inputs", unit="batch", disable=not progress, leave=False):
            state["mask"] = tb.valid(first_position)
            count = int(state["mask"].sum())
            state["pick"] = torch.randperm(count, generator=generator)[:per_batch]
            run_decoder(lm, tb)
    finally:
        hooks.remove_all()
    return {key: torch.cat(parts) for key, parts in rows.items() if parts}


def search_alphas(
    factors: Mapping[Key, SparseLowRank],
    inputs: Mapping[Key, torch.Tensor],
    sparsity: float,
    grid: Sequence[float] = ALPHA_GRID,
    *,
    progress: bool = True,
) -> tuple[dict[Key, float], dict[Key, list[float]]]:
    """Per linear layer the alpha of ``grid`` with the smallest relative output error on its captured
    inputs (ties to the larger alpha, the cheaper sparse path), and the error at every grid point."""
    from tqdm.auto import tqdm

    chosen, errors = {}, {}
    for key in tqdm(list(factors), desc="alpha search", unit="linear", disable=not progress, leave=False):
        f, x = factors[key], inputs[key]
        errs = [f.relative_error(x, f.budget(sparsity, a)) for a in grid]
        best = min(range(len(grid)), key=lambda i: (errs[i], -grid[i]))
        chosen[key], errors[key] = float(grid[best]), errs
    return chosen, errors


@dataclass(frozen=True)
class Variant:
    """One way of sparsifying, judged on the evaluation texts."""

    name: str
    description: str
    ce: float
    perplexity: float
    ppl_increase_percent: float  # over the dense model's
    macs_kept: float  # fraction of the touched layers' dense multiply-accumulates still done
    touched: str  # which layers it changes: "all linears" or "MLP down-projection"
    extra: dict[str, float] = field(default_factory=dict)


def measure(
    lm: LanguageModel,
    batches: Sequence[TokenBatch],
    factors: Mapping[Key, SparseLowRank],
    budgets: Mapping[Key, Budget],
    dense: Loss,
    name: str,
    description: str,
    touched: str,
    progress: bool,
) -> Variant:
    """Held-out loss with ``budgets`` applied, as a :class:`Variant`."""
    with RSparseEdit(lm, factors, budgets):
        loss = heldout_loss(lm, batches, desc=name, progress=progress)
    kept = sum(b.kept_macs for b in budgets.values()) / sum(b.dense_macs for b in budgets.values())
    return Variant(
        name, description, loss.ce, loss.perplexity, 100 * (loss.perplexity / dense.perplexity - 1), kept, touched
    )


@torch.inference_mode()
def cett_down_variant(
    lm: LanguageModel,
    batches: Sequence[TokenBatch],
    down_inputs: Mapping[int, torch.Tensor],
    sparsity: float,
    dense: Loss,
    *,
    first_position: int = 1,
    progress: bool = True,
) -> Variant:
    """CETT-style thresholds on the MLP activations that drop a fraction ``sparsity`` on the train
    tokens (``down_inputs``: per layer the captured activations), applied at every evaluation token."""
    from residlab.analyses.means import LayerMeans
    from residlab.analyses.sparsity import CETTCurve

    layers = sorted(down_inputs)
    thresholds, cetts, norms = {}, [], {}
    for layer in layers:
        curve = CETTCurve(down_inputs[layer], down_matrix(lm, layer))
        flat = curve.norms.flatten()
        index = min(flat.numel() - 1, max(0, round(sparsity * flat.numel()) - 1))
        thresholds[layer] = float(flat.kthvalue(index + 1).values) if sparsity > 0 else -1.0
        cetts.append(curve.cett(thresholds[layer]))
        norms[layer] = curve.column_norms.to(lm.device)
    dropped = LayerMeans(lm.num_layers)

    def make(layer: int) -> Any:
        def fn(value: torch.Tensor, ctx: Any) -> torch.Tensor:
            drop = value.float().abs() * norms[layer] <= thresholds[layer]
            dropped.add(layer, drop[ctx.positions >= first_position])
            return value.masked_fill(drop, 0)

        return fn

    with lm.edit(layers, "mlp_act", {layer: make(layer) for layer in layers}):
        loss = heldout_loss(lm, batches, desc="cett_down", progress=progress)
    measured = [v for v in dropped.means() if v == v]
    kept = 1 - sum(measured) / max(1, len(measured))
    return Variant(
        "cett_down",
        f"CETT thresholds dropping {100 * sparsity:g}% of MLP activations on train tokens",
        loss.ce,
        loss.perplexity,
        100 * (loss.perplexity / dense.perplexity - 1),
        kept,
        "MLP down-projection",
        {"mean_cett": sum(cetts) / len(cetts)},
    )
