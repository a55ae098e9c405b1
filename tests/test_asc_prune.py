"""The ``prune`` and ``prune-prose`` pair sources: the model's own trace with its redundant parts cut."""

import pytest

from residlab import ResidlabError
from residlab.data import load_problems
from residlab.evaluation.runner import Decoding
from residlab.methods.asc.pairs import CONCISE_SOURCES, PairRequest, keeps_computations
from residlab.methods.asc.prune import prune_trace
from tests.test_asc_methods import _verbose_record

# The default model's own style (GSM8K train 3, shortened): a plan, units in \text{}, a "let's start" line.
TRACE = """To determine how many pages Julie should read tomorrow, we need to follow these steps:

1. Calculate the number of pages Julie read today.
2. Determine the number of pages left in the book.
3. Calculate half of the remaining pages.

Let's start with the first step:
First, we know that Julie read 12 pages yesterday. Today, she read twice as many pages. So she read:
\\[ 2 \\times 12 \\text{ pages} = 24 \\text{ pages} \\]

Next, we subtract the pages read today from the total to find out how many pages are left:
\\[ \\text{Pages left} = 120 - 24 = 96 \\]

Julie wants to read half of the remaining pages tomorrow. So, we divide by 2:
\\[ \\frac{96}{2} = 48 \\]

Thus, Julie should read \\(\\boxed{48}\\) pages tomorrow."""


def test_prune_cuts_the_plan_its_announcement_and_the_units():
    pruned = prune_trace(TRACE)
    assert pruned.startswith("To determine how many pages Julie should read tomorrow:\n\nFirst, we know")
    assert "1. Calculate" not in pruned and "Let's start" not in pruned and "follow these steps" not in pruned
    assert "\\[ 2 \\times 12 = 24 \\]" in pruned  # the units after numbers went ...
    assert "\\text{Pages left} = 120 - 24 = 96" in pruned  # ... a label opening an equation stays
    assert "Today, she read twice as many pages." in pruned  # the narration stays unless cut="prose"
    assert "\n\n\n" not in pruned and pruned.endswith("\\(\\boxed{48}\\) pages tomorrow.")
    assert keeps_computations(pruned, TRACE, "Julie has a 120-page book and read 12 pages yesterday.", "48")


def test_prune_keeps_numbered_steps_that_carry_their_work():
    # Numbered headings each followed by their own work are the derivation, not a plan announced ahead.
    steps = (
        "To find the total:\n\n1. **Purple flowers:**\n   \\[ 10 + 8 = 18 \\]\n2. **Total:**\n   \\[ 10 + 18 = 28 \\]"
    )
    assert prune_trace(steps) == steps
    # One numbered line before the work is no plan either.
    assert prune_trace("1. Add them.\n\\[ 2 + 2 = 4 \\]") == "1. Add them.\n\\[ 2 + 2 = 4 \\]"
    # A plan item that computes is work: the run it sits in is not dropped.
    computing = "1. First 2 + 2 = 4.\n2. Then 4 * 3 = 12.\nSo \\boxed{12}"
    assert prune_trace(computing) == computing


def test_prune_prose_keeps_the_last_sentence_of_each_prose_line():
    pruned = prune_trace(TRACE, cut="prose")
    assert "So she read:\n\\[ 2 \\times 12 = 24 \\]" in pruned
    assert "Julie read 12 pages yesterday" not in pruned and "twice as many" not in pruned
    assert "So, we divide by 2:" in pruned and "wants to read half" not in pruned
    # Lines that compute keep every sentence; a line with one sentence is unchanged.
    assert prune_trace("She has 3 apples. She buys 2 = 5 in all.", cut="prose").startswith("She has 3 apples.")
    assert prune_trace("Add them up:", cut="prose") == "Add them up:"


def test_prune_equations_keeps_only_the_lines_that_compute_or_answer():
    pruned = prune_trace(TRACE, cut="equations")
    assert pruned.split("\n") == [
        "\\[ 2 \\times 12 = 24 \\]",
        "\\[ \\text{Pages left} = 120 - 24 = 96 \\]",
        "\\[ \\frac{96}{2} = 48 \\]",
        "Thus, Julie should read \\(\\boxed{48}\\) pages tomorrow.",
    ]
    assert keeps_computations(pruned, TRACE, "Julie has a 120-page book and read 12 pages yesterday.", "48")
    # A display block over several lines is kept whole, prose after it is not.
    block = "We add:\n\\[\n2 + 3\n= 5\n\\]\nThat is five.\nSo \\boxed{5}"
    assert prune_trace(block, cut="equations") == "\\[\n2 + 3\n= 5\n\\]\nSo \\boxed{5}"
    with pytest.raises(ResidlabError, match="unknown cut"):
        prune_trace(block, cut="words")  # type: ignore[arg-type]


def test_prune_sources_cut_only_correct_traces_and_grade_again():
    problems = load_problems("synthetic", "train", limit=3)
    steps = "To find it, we need to follow these steps:\n\n1. Halve.\n2. Add.\n\n"
    traces = [
        steps + "Half of 56 is:\n\\[ 56 / 2 = 28 \\text{ cups} \\]\nSo \\[ 56 + 28 = 84 \\]\n"
        f"\\boxed{{{problems[0].answer}}}",
        "wrong",
        "\\boxed{" + problems[2].answer + "}",
    ]
    verbose = [_verbose_record(p, t, c) for p, t, c in zip(problems, traces, [True, False, True], strict=True)]
    # The prune sources generate nothing: no runner, no work dir.
    request = PairRequest(None, problems, verbose, Decoding(), None, "both_correct", 1, None, None, False)  # type: ignore
    for source in ("prune", "prune-prose", "prune-equations"):
        concise = CONCISE_SOURCES[source](request)
        assert concise[1] == ("", False)  # a wrong verbose trace gives no concise side
        assert concise[0].correct and "follow these steps" not in concise[0].text and "cups" not in concise[0].text
        assert "56 / 2 = 28" in concise[0].text and "56 + 28 = 84" in concise[0].text
        assert concise[2] == (traces[2], True)  # nothing to cut: the trace itself
