"""Evaluation: grading answers (``grading``), running a data set under a generation condition into
resumable records (``runner``), statistics with confidence intervals and paired tests (``stats``), and
summaries, tables and plots (``report``)."""

from __future__ import annotations

from residlab.evaluation.grading import (
    Extraction,
    answers_match,
    extract_answer,
    grade,
    numbers_equal,
    parse_number,
)

__all__ = ["Extraction", "answers_match", "extract_answer", "grade", "numbers_equal", "parse_number"]
