from __future__ import annotations

import json
import re
import sys

import pytest

import residlab.data.problems as problems_module
from residlab.core.errors import ResidlabError
from residlab.data import (
    Problem,
    find_data_dir,
    load_jsonl,
    load_problems,
    split_gsm8k_answer,
    strip_calculator_marks,
    synthetic_problems,
)


@pytest.fixture
def data_dir(monkeypatch):
    monkeypatch.delenv("RESIDLAB_DATA_DIR", raising=False)
    found = find_data_dir()
    if found is None:
        pytest.skip("no shared/data folder with gsm8k/ or math500/ found")
    return found


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- parsing helpers


def test_strip_calculator_marks():
    assert strip_calculator_marks("48/2 = <<48/2=24>>24") == "48/2 = 24"
    assert strip_calculator_marks("a <<1+1=2>>2 and <<2*3=6>>6") == "a 2 and 6"
    assert strip_calculator_marks("no marks") == "no marks"


def test_split_gsm8k_answer_uses_last_marker_and_drops_commas():
    answer, solution = split_gsm8k_answer("It costs 2*500=<<2*500=1000>>1,000\n#### 1,000")
    assert answer == "1000"
    assert solution == "It costs 2*500=1,000"
    assert split_gsm8k_answer("a #### b\n#### 7")[0] == "7"
    with pytest.raises(ValueError):
        split_gsm8k_answer("no marker here")


# --------------------------------------------------------------------------- real data sets


def test_gsm8k_counts_and_first_problem(data_dir):
    test = load_problems("gsm8k", "test", data_dir=data_dir)
    train = load_problems("gsm8k", "train", data_dir=data_dir)
    assert (len(train), len(test)) == (7473, 1319)
    first = test[0]
    assert first.id == "gsm8k-test-00000"
    assert first.dataset == "gsm8k"
    assert first.question.startswith("Janet")
    assert first.answer == "18"
    assert first.solution.startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    assert "####" not in first.solution


def test_gsm8k_answers_are_plain_integers_and_marks_are_gone(data_dir):
    for problem in load_problems("gsm8k", "test", data_dir=data_dir):
        assert re.fullmatch(r"-?\d+", problem.answer), problem
        assert "<<" not in problem.solution and ">>" not in problem.solution, problem.id
        assert "####" not in problem.solution


def test_math500_fields(data_dir):
    problems = load_problems("math500", data_dir=data_dir)
    assert len(problems) == 500
    first = problems[0]
    assert first.id == "math500-test-00000"
    assert first.dataset == "math500"
    assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.question.startswith("Convert the point $(0,3)$")
    assert r"\boxed" in first.solution
    assert first.meta == {"unique_id": "test/precalculus/807.json", "subject": "Precalculus", "level": 2}
    assert problems[12].id == "math500-test-00012"


def test_math500_has_only_a_test_split(data_dir):
    with pytest.raises(ResidlabError, match="no split 'train'"):
        load_problems("math500", "train", data_dir=data_dir)


def test_limit_offset_and_stable_ids(data_dir):
    everything = load_problems("gsm8k", data_dir=data_dir)
    window = load_problems("gsm8k", data_dir=data_dir, offset=10, limit=5)
    assert window == everything[10:15]
    assert [p.id for p in window] == [f"gsm8k-test-{i:05d}" for i in range(10, 15)]
    assert load_problems("gsm8k", data_dir=data_dir, limit=3) == everything[:3]
    assert load_problems("gsm8k", data_dir=data_dir, offset=1318) == everything[1318:]
    # an empty window is an error, not a run over nothing (which reported NaN and exited 0)
    with pytest.raises(ResidlabError, match="no problems to run: gsm8k test has 1319 problem"):
        load_problems("gsm8k", data_dir=data_dir, offset=5000)
    with pytest.raises(ResidlabError, match="no problems to run"):
        load_problems("math500", data_dir=data_dir, limit=0)
    with pytest.raises(ResidlabError):
        load_problems("gsm8k", data_dir=data_dir, offset=-1)


def test_source_local_reads_the_same_data(data_dir):
    assert load_problems("gsm8k", limit=2, source="local") == load_problems("gsm8k", limit=2, data_dir=data_dir)


# --------------------------------------------------------------------------- locating data


def test_find_data_dir_honours_environment(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    monkeypatch.setenv("RESIDLAB_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert find_data_dir(other) == other  # an explicit argument wins over the environment


def test_find_data_dir_rejects_a_missing_named_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDLAB_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(ResidlabError, match="RESIDLAB_DATA_DIR"):
        find_data_dir()


def test_load_problems_reads_a_data_dir_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    write_lines(
        tmp_path / "gsm8k" / "test.jsonl",
        [json.dumps({"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"})],
    )
    monkeypatch.setenv("RESIDLAB_DATA_DIR", str(tmp_path))
    [problem] = load_problems("gsm8k")
    assert problem == Problem("gsm8k-test-00000", "What is 2+2?", "4", "2+2=4", "gsm8k")


def test_missing_split_file_in_data_dir(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(ResidlabError, match="not found"):
        load_problems("gsm8k", data_dir=tmp_path, source="local")


def test_no_data_and_no_datasets_package_explains_the_options(monkeypatch):
    monkeypatch.setattr(problems_module, "find_data_dir", lambda explicit=None: None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ResidlabError) as info:
        load_problems("gsm8k")
    message = str(info.value)
    assert "--data-dir" in message and "RESIDLAB_DATA_DIR" in message and "synthetic" in message
    with pytest.raises(ResidlabError, match="datasets"):
        load_problems("math500", source="hub")


def test_unknown_name_and_source():
    with pytest.raises(ResidlabError, match="unknown data set"):
        load_problems("not-a-dataset")
    with pytest.raises(ResidlabError, match="unknown source"):
        load_problems("synthetic", source="ftp")


# --------------------------------------------------------------------------- JSONL


def test_load_jsonl_with_field_mapping(tmp_path):
    path = write_lines(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"q": "One plus one?", "a": 2, "why": "1 + 1 = 2", "key": "p1", "level": 1}),
            "",
            json.dumps({"q": "Two times three?", "a": "6", "why": "2 * 3 = 6", "key": "p2"}),
        ],
    )
    problems = load_jsonl(path, question_field="q", answer_field="a", solution_field="why", id_field="key")
    assert [p.id for p in problems] == ["p1", "p2"]
    assert problems[0] == Problem("p1", "One plus one?", "2", "1 + 1 = 2", "jsonl", {"level": 1})
    assert problems[1].meta == {}


def test_load_jsonl_optional_fields_default(tmp_path):
    path = write_lines(tmp_path / "bare.jsonl", [json.dumps({"question": "Q?", "answer": "1"})] * 2)
    problems = load_jsonl(path, id_field="id", dataset="custom")
    assert [p.id for p in problems] == ["bare-00000", "bare-00001"]
    assert problems[0].solution == "" and problems[0].dataset == "custom"


def test_load_jsonl_with_answer_parser(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "Q?", "answer": "3*4=<<3*4=12>>12\n#### 12"})])
    [problem] = load_jsonl(path, solution_field=None, answer_parser=split_gsm8k_answer)
    assert (problem.answer, problem.solution) == ("12", "3*4=12")


def test_load_problems_accepts_a_jsonl_path(tmp_path):
    path = write_lines(
        tmp_path / "set.jsonl",
        [json.dumps({"question": f"Q{i}", "answer": str(i), "id": f"q{i}"}) for i in range(4)],
    )
    problems = load_problems(str(path), offset=1, limit=2)
    assert [p.id for p in problems] == ["q1", "q2"]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"question": "Q", "answer": ', "not valid JSON"),
        ('["question", "answer"]', "expected a JSON object"),
        ('{"question": "Q"}', "missing field 'answer'"),
        ('{"question": {"nested": 1}, "answer": "1"}', "must be a string or number"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, expected):
    good = json.dumps({"question": "Q", "answer": "1"})
    path = write_lines(tmp_path / "broken.jsonl", [good, "", bad_line, good])
    with pytest.raises(ResidlabError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert "broken.jsonl" in message
    assert "broken.jsonl:3:" in message
    assert expected in message
    assert info.value.hint


def test_gsm8k_row_without_marker_names_the_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    write_lines(tmp_path / "gsm8k" / "test.jsonl", [json.dumps({"question": "Q", "answer": "no marker"})])
    with pytest.raises(ResidlabError, match=r"test\.jsonl:1: "):
        load_problems("gsm8k", data_dir=tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ResidlabError, match="no JSONL file") as info:
        load_jsonl(tmp_path / "absent.jsonl")
    assert info.value.hint


# --------------------------------------------------------------------------- synthetic

_STEP = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


def _check_solution(problem: Problem) -> None:
    results = []
    for line in problem.solution.splitlines():
        match = _STEP.fullmatch(line)
        assert match, f"{problem.id}: not an equation: {line!r}"
        a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        computed = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert computed == result, f"{problem.id}: {line!r} is wrong"
        results.append(result)
    assert results and str(results[-1]) == problem.answer
    # Every number the first step starts from is given in the question.
    assert str(int(_STEP.fullmatch(problem.solution.splitlines()[0])[1])) in problem.question


def test_synthetic_problems_are_deterministic_and_correct():
    first = synthetic_problems(60, seed=3)
    assert first == synthetic_problems(60, seed=3)
    assert first != synthetic_problems(60, seed=4)
    assert synthetic_problems(10, seed=3) == first[:10]  # a prefix does not depend on n
    assert [p.id for p in first[:2]] == ["synthetic-00000", "synthetic-00001"]
    assert {p.meta["template"] for p in first} == {"sum", "difference", "product", "half_as_many", "unit_price"}
    for problem in first:
        assert problem.dataset == "synthetic"
        assert int(problem.answer) >= 0
        _check_solution(problem)


def test_synthetic_through_load_problems():
    problems = load_problems("synthetic", limit=5, offset=2)
    assert problems == synthetic_problems(7)[2:]
    assert load_problems("synthetic", "train", limit=3) == synthetic_problems(3, seed=1)
    assert len(load_problems("synthetic")) > 0
    with pytest.raises(ResidlabError):
        synthetic_problems(-1)


def test_empty_jsonl_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ResidlabError, match="no problems to run: .*empty.jsonl has 0 problem"):
        load_problems(str(path))
