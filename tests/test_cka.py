import json

import pytest
import torch

from residlab.analyses.cka import analyze_cka
from residlab.analyses.cka_math import (
    CkaAccumulator,
    even_stride_mapping,
    hsic,
    linear_cka,
    u_center_gram,
)
from residlab.core.errors import ResidlabError

TEXTS = [
    "The river flows north through the valley, past three old mills and a stone bridge.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in green plants.",
    "A prime number has exactly two divisors: one and itself, such as 2, 3, 5 and 7.",
    "The orchestra tuned its instruments while the audience found their seats in the hall.",
]


def _gauss(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference_cka(x, y):
    """Kornblith et al.'s feature-space formula, by hand."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(torch.linalg.norm(y.T @ x) ** 2 / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))


def _song_unbiased_hsic(k, l_gram):
    """Song et al. (2012), eq. 5, written out term by term."""
    n = k.shape[0]
    kt, lt = k.clone(), l_gram.clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    one = torch.ones(n, dtype=k.dtype)
    term = torch.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term -= 2 / (n - 2) * (one @ kt @ lt @ one)
    return float(term / (n * (n - 3)))


def test_biased_cka_matches_the_feature_space_formula_and_the_gram_form():
    x, y = _gauss(50, 7, 0), _gauss(50, 5, 1)
    y = y + x[:, :5]
    assert float(linear_cka(x, y)) == pytest.approx(_reference_cka(x, y), rel=1e-10)
    k, l_gram = x @ x.T, y @ y.T
    gram_form = hsic(k, l_gram) / (hsic(k, k) * hsic(l_gram, l_gram)).sqrt()
    assert float(gram_form) == pytest.approx(_reference_cka(x, y), rel=1e-10)


def test_u_centring_gives_song_et_al_unbiased_hsic():
    x, y = _gauss(12, 4, 2), _gauss(12, 3, 3)
    k, l_gram = x @ x.T, y @ y.T
    assert float(hsic(k, l_gram, debiased=True)) == pytest.approx(_song_unbiased_hsic(k, l_gram), rel=1e-10)
    u = u_center_gram(k)
    assert torch.allclose(u.diagonal(), torch.zeros(12, dtype=u.dtype))
    assert torch.allclose(u.sum(0), torch.zeros(12, dtype=u.dtype), atol=1e-10)  # U-centred rows sum to 0


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased):
    x, y = _gauss(40, 6, 4), _gauss(40, 6, 5) + _gauss(40, 6, 4)
    q, _ = torch.linalg.qr(_gauss(6, 6, 6))
    base = float(linear_cka(x, y, debiased=debiased))
    assert float(linear_cka(x @ q, y, debiased=debiased)) == pytest.approx(base, abs=1e-10)
    assert float(linear_cka(3.7 * x, 0.01 * y, debiased=debiased)) == pytest.approx(base, abs=1e-10)
    assert float(linear_cka(x, x @ q * 2, debiased=debiased)) == pytest.approx(1.0, abs=1e-10)


def test_debiased_is_near_zero_on_independent_data_where_biased_is_not():
    biased, debiased = [], []
    for seed in range(20):
        x, y = _gauss(32, 64, 100 + seed), _gauss(32, 64, 200 + seed)
        biased.append(float(linear_cka(x, y)))
        debiased.append(float(linear_cka(x, y, debiased=True)))
    mean_b, mean_d = sum(biased) / 20, sum(debiased) / 20
    assert 0.4 < mean_b < 0.8  # d = 64 > n = 32: biased CKA of pure noise is large
    assert abs(mean_d) < 0.05
    wide = [float(linear_cka(_gauss(256, 64, s), _gauss(256, 64, s + 50))) for s in range(3)]
    assert max(wide) < mean_b / 2  # the bias shrinks as n grows


def test_accumulator_one_minibatch_equals_the_one_shot_estimators_and_diagonal_is_one():
    layers = torch.stack([_gauss(30, 5, s) for s in range(3)])
    acc = CkaAccumulator(3, 3)
    acc.add(layers)
    result = acc.result()
    for i in range(3):
        assert result.biased[i][i] == pytest.approx(1.0)
        assert result.debiased[i][i] == pytest.approx(1.0)
        for j in range(3):
            assert result.biased[i][j] == pytest.approx(float(linear_cka(layers[i], layers[j])), rel=1e-9)
            assert result.debiased[i][j] == pytest.approx(
                float(linear_cka(layers[i], layers[j], debiased=True)), rel=1e-9, abs=1e-12
            )


def test_accumulator_sums_hsic_over_minibatches_not_cka():
    a, b = _gauss(40, 4, 7), _gauss(40, 3, 8)
    acc = CkaAccumulator(1, 1)
    acc.add(a[None, :20], b[None, :20])
    acc.add(a[None, 20:], b[None, 20:])
    h = [
        [float(hsic(x @ x.T, y @ y.T, debiased=True)) for x, y in ((p, q), (p, p), (q, q))]
        for p, q in ((a[:20], b[:20]), (a[20:], b[20:]))
    ]
    expected = (h[0][0] + h[1][0]) / ((h[0][1] + h[1][1]) * (h[0][2] + h[1][2])) ** 0.5
    assert acc.result().debiased[0][0] == pytest.approx(expected, rel=1e-10)
    assert acc.result().num_minibatches == 2 and acc.result().num_examples == 40


def test_bad_inputs_are_refused_with_a_hint():
    with pytest.raises(ResidlabError, match="same examples"):
        linear_cka(_gauss(5, 2, 0), _gauss(6, 2, 0))
    with pytest.raises(ResidlabError, match="at least 4"):
        linear_cka(_gauss(3, 2, 0), _gauss(3, 2, 0), debiased=True)
    with pytest.raises(ResidlabError, match="no minibatch"):
        CkaAccumulator(1, 1).result()


def test_even_stride_mapping():
    assert even_stride_mapping(4, 8) == [1, 3, 5, 7]
    assert even_stride_mapping(3, 3) == [0, 1, 2]
    assert even_stride_mapping(24, 30)[-1] == 29 and len(even_stride_mapping(24, 30)) == 24
    assert even_stride_mapping(4, 2) == [0, 0, 1, 1]  # round half to even at 0.5 -> 0


def test_analyze_cka_within_a_tiny_model(qwen, tmp_path):
    result = analyze_cka(qwen, TEXTS, max_tokens=24, minibatch=16, progress=False)
    n = qwen.num_layers
    assert result.unit == "token" and result.layers_a == result.layers_b == n
    for i in range(n):
        assert result.biased[i][i] == pytest.approx(1.0)
        assert result.debiased[i][i] == pytest.approx(1.0)
        for j in range(n):
            assert result.biased[i][j] == pytest.approx(result.biased[j][i], abs=1e-9)
    # tokens at position >= 1 of every text, minibatches of 16 (a remainder under 8 dropped)
    total = sum(min(len(qwen.tokenizer(t)["input_ids"]), 24) - 1 for t in TEXTS)
    assert total - 8 < result.num_examples <= total
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"cka.json", "cka_matrices.png", "cka_mapped.png"}
    assert "mapped_mean_debiased" in json.loads((tmp_path / "cka.json").read_text())["summary"]


def test_analyze_cka_between_two_models_pools_words(qwen):
    from residlab.testing import tiny_model

    llama = tiny_model("llama")
    result = analyze_cka(qwen, TEXTS, llama, max_tokens=64, minibatch=8, progress=False)
    assert result.unit == "word" and result.layers_b == llama.num_layers
    words = sum(len(t.split()) for t in TEXTS)
    assert words - 4 * 2 <= result.num_examples + 4 <= words  # first word of each text dropped (+ remainders)
    assert result.mapping == even_stride_mapping(qwen.num_layers, llama.num_layers)
    # the same model on both sides, compared per word: its diagonal is 1
    same = analyze_cka(qwen, TEXTS, qwen, max_tokens=64, minibatch=8, progress=False)
    for i in range(qwen.num_layers):
        assert same.debiased[i][i] == pytest.approx(1.0)
