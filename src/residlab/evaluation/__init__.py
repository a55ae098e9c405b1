"""Grading model answers: extract the final answer from generated text and compare it with the gold one."""

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
