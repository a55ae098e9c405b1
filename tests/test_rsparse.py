"""R-Sparse: the budget, the sparse + low-rank form, its fast path and the analysis, against hand computations."""

import numpy as np
import pytest
import torch

from residlab.analyses.heldout import batches_of, heldout_loss
from residlab.analyses.rsparse import analyze_rsparse
from residlab.analyses.rsparse_edit import RSparseEdit, factorise, search_alphas
from residlab.analyses.rsparse_factors import Budget, SparseLowRank, block_linears
from residlab.analyses.rsparse_speed import PreparedPath, sparse_matvec, time_linears
from residlab.core.errors import ResidlabError
from tests.conftest import hook_keys

TEXTS = [
    "The cat sat on the mat and looked at the dog.",
    "Paris is the capital of France and a large city.",
    "Water boils at one hundred degrees at sea level.",
    "The dog ran after the cat across the garden.",
]


def _linear(out_features, in_features, seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias)


def test_budget_by_hand():
    b = Budget(16, 16, 0.5, 0.0)  # all low-rank: r (16 + 16) <= 16 * 16 / 2 -> r = 4
    assert (b.channels, b.rank, b.kept_macs, b.dense_macs) == (0, 4, 128, 256)
    b = Budget(16, 16, 0.5, 1.0)  # all sparse: 8 channels
    assert (b.channels, b.rank, b.kept_macs) == (8, 0, 128)
    b = Budget(16, 8, 0.5, 0.5)  # 4 channels (32 MACs) leave 32 for r (16 + 8): r = 1
    assert (b.channels, b.rank, b.kept_macs) == (4, 1, 56)
    b = Budget(896, 4864, 0.5, 0.0)
    assert b.rank == 378 and b.kept_macs <= b.dense_macs / 2
    with pytest.raises(ResidlabError, match="sparsity"):
        Budget(4, 4, 1.0, 0.5)


def test_apply_is_the_masked_weight_plus_the_truncated_svd_of_the_rest():
    layer = _linear(6, 10)
    f = SparseLowRank(layer, max_rank=6)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    budget = Budget(10, 6, 0.3, 0.5)  # 4 channels kept (round(10 * 0.7 * 0.5) = 4 rounds half to even), r = 1
    assert (budget.channels, budget.rank) == (4, 1)
    w = layer.weight.detach().numpy()
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    low = (u[:, :1] * s[:1]) @ vh[:1]
    score = np.abs(x.numpy()) * np.linalg.norm(w, axis=0)
    expected = []
    for row, sc in zip(x.numpy(), score, strict=True):
        keep = np.zeros(10, dtype=bool)
        keep[np.argsort(-sc)[:4]] = True
        expected.append(w @ (row * keep) + low @ (row * ~keep) + layer.bias.detach().numpy())
    assert np.allclose(f.apply(x, budget).numpy(), np.array(expected), atol=1e-5)
    # alpha = 1 at sparsity 0 keeps every channel: the layer itself
    assert torch.allclose(f.apply(x, Budget(10, 6, 0.0, 1.0)), layer(x), atol=1e-6)


def test_fast_path_equals_the_masked_form():
    layer = _linear(24, 40, bias=True)
    f = SparseLowRank(layer, max_rank=20)
    x = torch.randn(40, generator=torch.Generator().manual_seed(2))
    for alpha in (0.0, 0.3, 0.9, 1.0):
        budget = f.budget(0.5, alpha)
        assert torch.allclose(sparse_matvec(PreparedPath.of(f, budget), x), f.apply(x, budget), atol=1e-5)
    rows = time_linears({"l": f}, {"l": x}, {"l": f.budget(0.5, 0.5)}, min_run_time=0.01)
    assert rows[0].dense_us > 0 and rows[0].sparse_us > 0 and rows[0].macs_kept <= 0.5


def test_alpha_search_picks_the_zero_error_extreme():
    low_rank = torch.nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        low_rank.weight.copy_(torch.outer(torch.arange(16.0), torch.ones(16)))  # rank 1: SVD is exact
    factors = {(0, "low"): SparseLowRank(low_rank, 4), (0, "sparse"): SparseLowRank(_linear(16, 16, bias=False), 4)}
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    few = torch.zeros(32, 16)
    few[:, :3] = x[:, :3]  # 3 active channels <= the 8 that alpha = 1 keeps: exact
    alphas, errors = search_alphas(factors, {(0, "low"): x, (0, "sparse"): few}, 0.5, (0.0, 1.0), progress=False)
    assert alphas == {(0, "low"): 0.0, (0, "sparse"): 1.0}
    assert errors[0, "low"][0] < 1e-5 and errors[0, "sparse"][1] < 1e-6 and errors[0, "sparse"][0] > 0.01


def test_rsparse_edit_keeping_everything_is_exact_and_leaves_no_hook(lm):
    batches = batches_of(lm, TEXTS, 16, 2)
    dense, keys = heldout_loss(lm, batches, progress=False), hook_keys(lm)
    factors = factorise(lm, [0, 2], 0.0, progress=False)
    assert {name for (_, name) in factors} == {name for name, _ in block_linears(lm.blocks[0])}
    with RSparseEdit(lm, factors, {k: f.budget(0.0, 1.0) for k, f in factors.items()}):
        same = heldout_loss(lm, batches, progress=False)
    with RSparseEdit(lm, factors, {k: f.budget(0.5, 1.0) for k, f in factors.items()}):
        changed = heldout_loss(lm, batches, progress=False)
    assert same.ce == pytest.approx(dense.ce, abs=1e-4) and abs(changed.ce - dense.ce) > 1e-4
    assert hook_keys(lm) == keys


def test_analyze_rsparse_variants_keep_the_budget(qwen, tmp_path):
    r = analyze_rsparse(qwen, TEXTS[:2], TEXTS[2:], sparsity=0.5, max_tokens=16, search_tokens=16, progress=False)
    names = [v.name for v in r.variants]
    assert names == ["topk", "lowrank", "uniform", "searched", "cett_down", "topk_down", "searched_down"]
    for v in r.variants:
        assert 0.4 < v.macs_kept <= 0.5 + 0.02, v  # the CETT threshold keeps about half on unseen tokens
        assert v.ppl_increase_percent == pytest.approx(100 * (v.perplexity / r.dense_perplexity - 1))
    assert set(r.searched_alphas) == {name for name, _ in block_linears(qwen.blocks[0])}
    assert all(a in r.alpha_grid for alphas in r.searched_alphas.values() for a in alphas)
    assert r.speed_layer == 1 and len(r.speed) == 21 and "mean_cett" in r.variants[4].extra
    assert {p.name for p in r.save(tmp_path)} == {
        "rsparse.json",
        "rsparse_perplexity.png",
        "rsparse_alphas.png",
        "rsparse_speed.png",
    }
