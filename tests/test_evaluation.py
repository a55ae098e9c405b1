import json

import pytest

from residlab import ResidlabError
from residlab.core.records import JsonlStore
from residlab.data import synthetic_problems
from residlab.evaluation.runner import Condition, Decoding, evaluate, records_path
from residlab.evaluation.stats import bootstrap_mean_difference, compare_paired, mcnemar_exact, wilson_interval


def test_jsonl_store_repairs_a_torn_last_line(tmp_path):
    store = JsonlStore(tmp_path / "r.jsonl")
    store.append([{"id": 1}, {"id": 2}])
    with open(store.path, "ab") as fh:
        fh.write(b'{"id": 3, "out')  # a kill in the middle of a write
    assert [r["id"] for r in store.read()] == [1, 2]
    store.append([{"id": 3}])
    assert [r["id"] for r in store.read()] == [1, 2, 3]
    assert store.path.read_text().count("\n") == 3


def test_jsonl_store_reports_damage_with_line_number(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(ResidlabError, match=r"r.jsonl:2: "):
        JsonlStore(path).read()


class SimulatedKill(BaseException):
    """Like a kill: not an Exception, so nothing on the way may swallow it."""


def test_runner_resumes_after_a_kill_without_loss_or_duplicates(qwen, tmp_path, monkeypatch):
    problems = synthetic_problems(6, seed=3)
    condition = Condition("baseline", "{question}")
    decoding = Decoding(max_new_tokens=4, batch_size=2)
    real_decode = qwen.decode_batch
    calls = []
    kill = {"at": 2}

    def dying_decode(batch, *args, **kwargs):
        calls.append(len(batch.rows))
        if len(calls) == kill["at"]:
            raise SimulatedKill  # killed during the second batch
        return real_decode(batch, *args, **kwargs)

    monkeypatch.setattr(qwen, "decode_batch", dying_decode)
    with pytest.raises(SimulatedKill):
        evaluate(qwen, problems, condition, decoding, tmp_path, progress=False)
    path = records_path(tmp_path, condition, decoding, qwen)
    first = JsonlStore(path).read()
    assert [r["id"] for r in first] == [p.id for p in problems[:2]]
    with open(path, "ab") as fh:
        fh.write(b'{"id": "torn')
    calls.clear()
    kill["at"] = None
    records = evaluate(qwen, problems, condition, decoding, tmp_path, progress=False)
    assert calls == [2, 2]  # only the four missing problems were generated
    assert [r.id for r in records] == [p.id for p in problems]
    stored = JsonlStore(path).read()
    assert sorted(r["id"] for r in stored) == sorted(p.id for p in problems)  # none lost, none twice
    assert stored[:2] == first  # finished work is kept as it was
    assert [r.to_json() for r in records] == stored  # what is returned is what is stored


def test_fingerprint_separates_conditions(qwen):
    from conftest import random_vector

    vec = random_vector(qwen, [1])
    decoding = Decoding()
    a = Condition("asc", vector=vec, strength=1.0).fingerprint(decoding, qwen.name)
    b = Condition("asc", vector=vec, strength=2.0).fingerprint(decoding, qwen.name)
    c = Condition("asc", vector=vec * 2, strength=1.0).fingerprint(decoding, qwen.name)
    d = Condition("asc", vector=vec, strength=1.0).fingerprint(Decoding(max_new_tokens=7), qwen.name)
    assert len({a, b, c, d}) == 4
    assert Condition("x", vector=vec, strength=0.0).fingerprint(decoding, "m") == Condition("x").fingerprint(
        decoding, "m"
    )


def test_wilson_and_mcnemar_hand_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    # 1 vs 6 discordant pairs: two-sided exact p = 2 * (1 + 7) / 128 = 0.125
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_paired_comparison():
    a = [True] * 10 + [False] * 10
    b = [True] * 8 + [False] * 12
    result = compare_paired(a, b, [100] * 20, [40] * 20)
    assert result.accuracy_difference == pytest.approx(-0.1)
    assert result.a_only_correct == 2 and result.b_only_correct == 0
    assert result.token_ratio == pytest.approx(0.4)
    low, high = result.accuracy_difference_ci95
    assert low < -0.1 < high <= 0
    est, lo, hi = bootstrap_mean_difference([0, 0, 0], [1, 1, 1])
    assert est == lo == hi == 1.0


def test_records_are_valid_json_lines(qwen, tmp_path):
    problems = synthetic_problems(2, seed=1)
    evaluate(qwen, problems, Condition("b"), Decoding(max_new_tokens=3, batch_size=2), tmp_path, progress=False)
    for line in next(tmp_path.glob("b-*.jsonl")).read_text().splitlines():
        assert json.loads(line)["condition"] == "b"
