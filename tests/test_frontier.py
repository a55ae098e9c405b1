"""The frontier's summary number and oracle against hand computations."""

from __future__ import annotations

import pytest

from residlab.evaluation.frontier import FrontierPoint, shortest_correct_oracle, tokens_saved
from residlab.evaluation.records import EvalRecord


def _point(label, correct, tokens):
    return FrontierPoint(label, tuple(correct), tuple(tokens))


BASE = _point("baseline", [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [100] * 10)


def test_tokens_saved_takes_the_best_point_within_two_points():
    same_acc_short = _point("s0.2", [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [70] * 10)  # -30%, same accuracy
    shorter_worse = _point("s0.4", [1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [40] * 10)  # -60%, 10 points worse
    saved = tokens_saved(BASE, [same_acc_short, shorter_worse], samples=500)
    assert saved.estimate == pytest.approx(0.30)
    assert saved.best_point == "s0.2" and saved.tolerance == 0.02
    low, high = saved.ci95
    assert 0.0 <= low <= 0.30 + 1e-9 and 0.30 - 1e-9 <= high <= 0.60 + 1e-9
    # With a 10-point tolerance the shorter point qualifies.
    assert tokens_saved(BASE, [same_acc_short, shorter_worse], tolerance=0.10).estimate == pytest.approx(0.60)


def test_no_qualifying_point_saves_nothing():
    worse = _point("s1", [0] * 10, [10] * 10)
    saved = tokens_saved(BASE, [worse], samples=200)
    assert saved.estimate == 0.0 and saved.best_point is None
    longer = _point("s-1", [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [150] * 10)  # qualifies but saves nothing
    assert tokens_saved(BASE, [longer], samples=200).estimate == 0.0
    with pytest.raises(ValueError):
        tokens_saved(BASE, [_point("x", [1], [1])])


def _record(pid, tokens, correct, hit_limit=False):
    return EvalRecord(pid, "c", "", tokens, hit_limit, 0.0, 0.0, 1, None, "none", "1", correct, 0.0)


def test_oracle_is_the_shortest_correct_of_greedy_and_samples():
    greedy = [_record("a", 100, True), _record("b", 80, False), _record("c", 90, False)]
    samples = {
        "a": [_record("a", 60, True), _record("a", 40, False)],
        "b": [_record("b", 120, True), _record("b", 70, True, hit_limit=True)],  # cut off: not solved
        "c": [_record("c", 50, False)],
    }
    oracle = shortest_correct_oracle(greedy, samples)
    assert oracle.correct == (True, True, False)
    assert oracle.tokens == (60, 120, 90)  # an unsolved problem keeps the greedy record
