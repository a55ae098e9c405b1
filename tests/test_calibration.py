import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from residlab.recipes.calibration import (
    _last_logits,
    calibrate,
    directional_derivatives,
    kl_bound,
    positive_cubic_root,
    strength_from_bound,
)


def test_hand_computed_case():
    # a = 2, L = 4, eps = 0.01: beta = 4 * 0.01 * 16 / 16 = 0.04; root of x^3 + x^2 - 0.04 = 0
    x = positive_cubic_root(0.04)
    assert x**3 + x**2 == pytest.approx(0.04, abs=1e-12)
    assert x == pytest.approx(0.18382, abs=1e-4)  # by hand: 0.18382^3 + 0.18382^2 = 0.0062 + 0.0338
    gamma_raw = 2 / 4 * x
    expected = (1 - 4 * gamma_raw / (4 * 2)) * gamma_raw
    assert strength_from_bound(2.0, 4.0, 0.01) == pytest.approx(expected, rel=1e-9)
    # the cubic's two regimes (three real roots / one real root) join continuously at beta = 4/27
    assert positive_cubic_root(4 / 27 - 1e-9) == pytest.approx(positive_cubic_root(4 / 27 + 1e-9), abs=1e-6)
    assert positive_cubic_root(10.0) ** 3 + positive_cubic_root(10.0) ** 2 == pytest.approx(10.0)


def test_limits():
    a, eps = 3.0, 1e-3
    assert strength_from_bound(a, 0.0, eps) == pytest.approx(2 * math.sqrt(eps) / a)
    assert strength_from_bound(a, 1e-9, eps) == pytest.approx(2 * math.sqrt(eps) / a, rel=1e-4)  # L -> 0
    assert strength_from_bound(0.0, 5.0, eps) == pytest.approx((16 * eps) ** 0.25 / math.sqrt(5.0))
    # a = 0 exactly: the quartic term alone meets eps
    assert kl_bound(0.0, 5.0, strength_from_bound(0.0, 5.0, eps)) == pytest.approx(eps)
    assert math.isinf(strength_from_bound(0.0, 0.0, eps))


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-3, 1e3), st.floats(0.0, 1e3), st.floats(1e-6, 1.0))
def test_strength_respects_the_bound(a, lipschitz, eps):
    gamma = strength_from_bound(a, lipschitz, eps)
    assert gamma >= 0
    # dropping the quartic term and the (1 - L g / 4a) shrink keep the full bound within ~eps
    assert kl_bound(a, lipschitz, gamma) <= eps * 1.0001 + 1e-15


def test_jvp_matches_finite_differences(qwen):
    text = "Natalia sold clips to 48 of her friends."
    direction = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(0))
    jv, hv = directional_derivatives(qwen, text, 1, direction, add_special_tokens=True)
    ids = qwen.encode([text]).input_ids
    unit = direction / direction.norm()
    delta = 1e-2
    with torch.no_grad():
        plus = _last_logits(qwen, ids, 1, unit, torch.tensor(delta)).double()
        zero = _last_logits(qwen, ids, 1, unit, torch.tensor(0.0)).double()
        minus = _last_logits(qwen, ids, 1, unit, torch.tensor(-delta)).double()
    fd_first = (plus - minus) / (2 * delta)
    fd_second = (plus - 2 * zero + minus) / delta**2
    torch.testing.assert_close(jv.double(), fd_first, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(hv.double(), fd_second, rtol=5e-2, atol=5e-2)
    assert float(jv.norm()) > 0


def test_calibrate_measures_kl_near_the_bound(qwen):
    texts = [
        "Natalia sold clips to 48 of her friends.",
        "How many clips did Natalia sell?",
        "Weng earns $12 an hour for babysitting.",
    ]
    direction = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(1))
    cal = calibrate(qwen, texts, texts, 1, direction, eps=1e-3, add_special_tokens=True)
    assert cal.strength > 0 and cal.a > 0
    assert cal.bound_at_strength <= 1e-3 * 1.001
    # the bound holds in practice too (softmax Fisher <= 1/2): measured KL stays below eps
    assert 0 <= cal.measured_kl_median <= 1e-3


def test_centred_bound_is_valid_and_tighter(qwen):
    texts = ["Natalia sold clips to 48 of her friends.", "How many clips did Natalia sell?"]
    direction = torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(2))
    cal = calibrate(qwen, texts, texts, 1, direction, eps=1e-3, add_special_tokens=True)
    assert cal.a_centred <= cal.a + 1e-6 and cal.strength_centred >= cal.strength
    # still a valid bound: the KL measured at the centred strength stays within eps
    from residlab.recipes.calibration import measured_kl

    assert max(measured_kl(qwen, texts, 1, direction, cal.strength_centred, add_special_tokens=True)) <= 1.2e-3
