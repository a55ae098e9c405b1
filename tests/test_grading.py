from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residlab.data import find_data_dir, load_problems
from residlab.evaluation import Extraction, answers_match, extract_answer, grade, numbers_equal, parse_number

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "value", "rule"),
    [
        (r"So the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}", "boxed"),
        (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}", "boxed"),
        (r"First \boxed{3}, then on reflection \boxed{4}.", "4", "boxed"),
        (r"\fbox{7}", "7", "boxed"),
        (r"The answer is \boxed{ $12$ }", "12", "boxed"),
        (r"\boxed 5$ is it", "5", "boxed"),
        (r"\boxed{1,000}", "1000", "boxed"),
        (r"first \boxed{2} then a truncated \boxed{3", "2", "boxed"),
        ("#### 1,000", "1000", "hash"),
        ("She pays 5.\n#### $72\nThe answer is 9", "72", "hash"),
        ("#### 3\nlater\n#### 4", "4", "hash"),
        ("The answer is $18.", "18", "answer_is"),
        ("The answer is 2.50.", "2.50", "answer_is"),
        ("**Answer:** 42", "42", "answer_is"),
        ("Answer: **42**", "42", "answer_is"),
        ("Final answer: 7 apples", "7 apples", "answer_is"),
        ("Final Answer: The final answer is $18$. I hope it is correct.", "18", "answer_is"),
        ("THE ANSWER IS 5", "5", "answer_is"),
        ("I answered 3 of them, so 8.", "8", "last_number"),
        ("She has 3 apples and 1,234 pears", "1234", "last_number"),
        ("Temperature fell to -3", "-3", "last_number"),
        ("It costs $5", "5", "last_number"),
        ("It costs $2.50.", "2.50", "last_number"),
        ("Use 3/4 of a cup", "3/4", "last_number"),
        ("no digits here", None, "none"),
        ("", None, "none"),
    ],
)
def test_extract_answer(text, value, rule):
    assert extract_answer(text) == Extraction(value, rule)


def test_boxed_takes_priority_over_later_rules():
    assert extract_answer(r"\boxed{5} #### 6 The answer is 7. 8").rule == "boxed"
    assert extract_answer("#### 6\nThe answer is 7. 8").rule == "hash"
    assert extract_answer("The answer is 7. Then 8").value == "7"


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", 1234.0),
        ("$5.00", 5.0),
        ("3/4", 0.75),
        ("50%", 50.0),
        (r"\frac{3}{4}", 0.75),
        (r"\dfrac34", 0.75),
        (r"-\frac{1}{2}", -0.5),
        (r"10,\!080", 10080.0),
        ("-7", -7.0),
        ("abc", None),
        ("1/0", None),
        ("inf", None),
        ("nan", None),
        ("1,23", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_numbers_equal():
    assert numbers_equal("1,000", "1000")
    assert numbers_equal("2.50", "2.5")
    assert numbers_equal("1/3", "0.3333333333")
    assert not numbers_equal("1/3", "0.33")
    assert not numbers_equal("72", "73")
    assert not numbers_equal(None, "1")
    assert not numbers_equal("seven", "7")


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("72", "72", True),
        ("72 clips", "72", True),
        ("$72.00", "72", True),
        ("1,000", "1000", True),
        ("-3", "-3", True),
        ("73", "72", False),
        ("about seventy", "72", False),
        (None, "72", False),
        ("", "72", False),
    ],
)
def test_answers_match_numeric(predicted, gold, expected):
    assert answers_match(predicted, gold, dataset="gsm8k") is expected
    assert answers_match(predicted, gold, dataset="synthetic") is expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("0.5", r"\frac{1}{2}", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"\dfrac12", r"\frac{1}{2}", True),
        (r"\tfrac{1}{2}", r"\frac12", True),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
        ("x=5", "5", True),
        ("5", "x=5", True),
        ("10080", r"10,\!080", True),
        ("p-q", "p - q", True),
        ("q - p", "p - q", False),
        (r"(3, \frac{\pi}{3})", r"\left( 3, \frac{\pi}{2} \right)", False),
        ("6", "5", False),
        (None, "5", False),
    ],
)
def test_answers_match_math(predicted, gold, expected):
    assert answers_match(predicted, gold, dataset="math500") is expected


def test_math_matching_works_off_the_main_thread():
    # math-verify's default timeouts use SIGALRM, which raises outside the main thread.
    results: list[bool] = []

    def work() -> None:
        results.append(answers_match(r"\dfrac12", "0.5", dataset="math500"))
        results.append(answers_match("0.4", "0.5", dataset="math500"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert results == [True, False]


def test_grade():
    extraction, correct = grade("Natalia sold 48 / 2 = 24 clips in May.\n#### 72", "72", dataset="gsm8k")
    assert extraction == Extraction("72", "hash") and correct
    extraction, correct = grade(r"so $x = \boxed{\frac{1}{2}}$", "0.5", dataset="math500")
    assert extraction.rule == "boxed" and correct
    assert grade("no idea", "3", dataset="gsm8k") == (Extraction(None, "none"), False)


def test_math500_reference_solutions_grade_as_correct():
    if find_data_dir() is None:
        pytest.skip("no shared/data folder found")
    for problem in load_problems("math500", limit=100):
        extraction, correct = grade(problem.solution, problem.answer, dataset="math500")
        assert correct, (problem.id, extraction, problem.answer)


def test_gsm8k_reference_solutions_grade_as_correct():
    if find_data_dir() is None:
        pytest.skip("no shared/data folder found")
    for problem in load_problems("gsm8k", limit=200):
        assert grade(f"{problem.solution}\n#### {problem.answer}", problem.answer, dataset="gsm8k")[1], problem.id
    # Without the marker the last number of the solution is (almost always) the answer.
    last_number_hits = sum(grade(p.solution, p.answer, dataset="gsm8k")[1] for p in load_problems("gsm8k", limit=200))
    assert last_number_hits >= 180


# --------------------------------------------------------------------------- properties


@given(st.integers())
def test_boxed_integer_round_trips(n):
    extraction = extract_answer(f"After some work we get \\boxed{{{n}}} as the result.")
    assert extraction.rule == "boxed"
    assert numbers_equal(extraction.value, str(n))
    if abs(n) < 2**53:
        assert parse_number(extraction.value) == n


@given(st.integers())
def test_thousands_separators_do_not_change_the_number(n):
    assert numbers_equal(f"{n:,}", str(n))
    assert answers_match(f"{n:,}", str(n), dataset="gsm8k")
    assert not numbers_equal(f"{n:,}", str(n + 1 + abs(n)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(), st.sampled_from(["gsm8k", "math500", "synthetic", "jsonl"]))
def test_grade_never_raises(text, dataset):
    extraction, correct = grade(text, "42", dataset=dataset)
    assert isinstance(correct, bool)
    assert extraction.rule in {"boxed", "hash", "answer_is", "last_number", "none"}
    assert (extraction.value is None) == (extraction.rule == "none")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}fracx=0123456789$#,.-/ ")), max_size=40))
def test_grade_never_raises_on_latexish_text(text):
    grade(text, r"\frac{1}{2}", dataset="math500")
    grade(text, "1,000", dataset="gsm8k")
