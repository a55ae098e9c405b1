"""Activation-Steered Compression (ASC): a steering vector that shortens a model's reasoning.

The package owns the method, one stage per module:

- ``config``: :class:`CompressConfig`, what ``residlab compress`` decides (frozen), and the run dir;
- ``prompts`` and ``conditions``: the prompt templates (one map, :data:`TEMPLATES`) and the
  steered / unsteered conditions that are compared;
- ``pairs`` (with ``teacher``): verbose and concise traces per train problem, from a registry of
  concise sources (:data:`CONCISE_SOURCES`);
- ``vector``: the concise-minus-verbose vector at every layer, and the one-layer vector compress saves;
- ``steering``: the pure resolution of the steering layer and strength (:func:`resolve_steering`);
- ``calibration``: the KL-bound calibration on train problems (:func:`calibrate_strength`), shared by
  ``compress`` and ``eval --strength auto``;
- ``report``: report.json, report.md and the plots;
- ``pipeline``: :func:`run_compress`, which runs the stages in order.

The sweep over layers and strengths is ``residlab.methods.sweep``.
"""

from residlab.methods.asc.calibration import (
    CalibratedStrength,
    CalibrationProblems,
    calibrate_strength,
    calibrate_vector,
)
from residlab.methods.asc.conditions import TEMPLATES, compress_conditions, template
from residlab.methods.asc.config import STRENGTH_MODES, CompressConfig, parse_strength, run_dir_for
from residlab.methods.asc.pairs import (
    CONCISE_SOURCES,
    ConciseTrace,
    PairStats,
    TracePair,
    build_pairs,
    read_pairs_file,
    reference_trace,
    shortest_correct,
)
from residlab.methods.asc.pipeline import run_compress
from residlab.methods.asc.report import CompressOutcome, write_report
from residlab.methods.asc.steering import SteeringChoice, choose_layer, resolve_steering, vector_layer
from residlab.methods.asc.teacher import TeacherClient
from residlab.methods.asc.vector import ConciseVector, build_concise_vector, extract_vector, steering_vector

__all__ = [
    "CONCISE_SOURCES",
    "STRENGTH_MODES",
    "TEMPLATES",
    "CalibratedStrength",
    "CalibrationProblems",
    "CompressConfig",
    "CompressOutcome",
    "ConciseTrace",
    "ConciseVector",
    "PairStats",
    "SteeringChoice",
    "TeacherClient",
    "TracePair",
    "build_concise_vector",
    "build_pairs",
    "calibrate_strength",
    "calibrate_vector",
    "choose_layer",
    "compress_conditions",
    "extract_vector",
    "parse_strength",
    "read_pairs_file",
    "reference_trace",
    "resolve_steering",
    "run_compress",
    "run_dir_for",
    "shortest_correct",
    "steering_vector",
    "template",
    "vector_layer",
    "write_report",
]
