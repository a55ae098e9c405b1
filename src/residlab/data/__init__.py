"""Data: problem sets (``problems``: GSM8K, MATH-500, users' JSONL files and built-in synthetic word
problems) and texts to analyse (``texts``)."""

from __future__ import annotations

from residlab.data.problems import (
    DATA_DIR_ENV,
    KNOWN_DATASETS,
    Problem,
    find_data_dir,
    load_jsonl,
    load_problems,
    split_gsm8k_answer,
    strip_calculator_marks,
    synthetic_problems,
)

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_DATASETS",
    "Problem",
    "find_data_dir",
    "load_jsonl",
    "load_problems",
    "split_gsm8k_answer",
    "strip_calculator_marks",
    "synthetic_problems",
]
