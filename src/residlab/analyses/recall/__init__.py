"""Factual recall (Lv et al. 2024, arXiv 2403.19521): direct logit attribution that adds up to the
logit, mover heads, head knockouts, and the final layer's suppression of the answer.

- :func:`analyze_recall` runs the whole analysis on recall prompts (:mod:`residlab.data.recall_prompts`)
  and returns a :class:`RecallResult` (JSON + PNG figures + summary + the paper's findings judged).
- :mod:`.dla`: the per-component DLA at the last position; :mod:`.norms`: norms with a frozen scale.
"""

from residlab.analyses.recall.analysis import analyze_recall, outcome, rank_heads
from residlab.analyses.recall.dla import BatchDLA, measure_dla
from residlab.analyses.recall.norms import FrozenNorm, freeze_norm
from residlab.analyses.recall.result import (
    BranchAblation,
    FinalLayerEffect,
    Finding,
    HeadCandidate,
    Knockout,
    Outcome,
    RecallResult,
)

__all__ = [
    "BatchDLA",
    "BranchAblation",
    "FinalLayerEffect",
    "Finding",
    "FrozenNorm",
    "HeadCandidate",
    "Knockout",
    "Outcome",
    "RecallResult",
    "analyze_recall",
    "freeze_norm",
    "measure_dla",
    "outcome",
    "rank_heads",
]
