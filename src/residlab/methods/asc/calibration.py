"""ASC stage 3b: the KL-bound calibration on train problems, shared by ``compress`` and ``eval --strength auto``.

The bound's constants are estimated on ``states`` prompts of a dataset's train split, and the KL is
measured on as many held-out ones right after them, always on the plain (verbose) prompt and in
float32 (calibration differentiates through the model twice).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from residlab.core.errors import ResidlabError
from residlab.data import load_problems
from residlab.methods.asc import prompts
from residlab.methods.asc.config import CompressConfig
from residlab.methods.asc.steering import vector_layer
from residlab.models.lm import LanguageModel
from residlab.models.loading import load
from residlab.recipes.calibration import Calibration, calibrate, kl_bound, measured_kl
from residlab.vectors.steering_vector import SteeringVector

_COMPRESS_DEFAULTS = CompressConfig()


@dataclass(frozen=True)
class CalibrationProblems:
    """Which train problems calibrate: ``states`` from ``offset`` for the bound, the next ``states`` held out.

    The defaults are what ``compress`` uses with its defaults: the problems right after its pairs.
    """

    dataset: str = _COMPRESS_DEFAULTS.pairs_dataset
    offset: int = _COMPRESS_DEFAULTS.pairs
    states: int = _COMPRESS_DEFAULTS.calibration_states
    data_dir: str | None = None

    @classmethod
    def after_pairs(cls, cfg: CompressConfig) -> CalibrationProblems:
        """The problems right after ``cfg``'s pair problems, so that none was used twice."""
        return cls(cfg.pairs_dataset, cfg.pairs, cfg.calibration_states, cfg.data_dir)


@dataclass(frozen=True)
class CalibratedStrength:
    """The bound's calibration, the strength chosen from it, and what that strength does on held-out states."""

    calibration: Calibration
    strength: float  # on the unit vector
    measured_kl_median: float  # KL at ``strength`` on the held-out states (NaN if there are none)
    bound: float  # the bound's KL at ``strength``

    def report(self) -> dict[str, Any]:
        """The calibration as report.json records it."""
        return {
            **self.calibration.as_dict(),
            "measured_kl_at_used_strength_median": self.measured_kl_median,
            "bound_at_used_strength": self.bound,
        }


def calibrate_strength(
    model: str,
    problems: CalibrationProblems,
    layer: int,
    direction: torch.Tensor,
    *,
    eps: float,
    lm: LanguageModel | None = None,
    choose: Callable[[Calibration], float] | None = None,
) -> CalibratedStrength:
    """Calibrate the KL bound for ``direction`` at ``layer`` of ``model`` and measure the chosen strength.

    ``lm`` is reused when it is float32 (else ``model`` is loaded in float32); ``choose`` picks the
    strength from the calibration (default: the bound's strength).
    """
    train = load_problems(
        problems.dataset, "train", data_dir=problems.data_dir, offset=problems.offset, limit=2 * problems.states
    )
    calib_lm = lm if lm is not None and lm.dtype == torch.float32 else load(model, dtype="float32")
    texts = [calib_lm.format_prompt(prompts.VERBOSE.format(question=p.question)) for p in train]
    fitted, held_out = texts[: problems.states], texts[problems.states :]
    calibration = calibrate(calib_lm, fitted, held_out, layer, direction, eps=eps)
    strength = choose(calibration) if choose is not None else calibration.strength
    # The KL the chosen strength actually causes on the held-out next-token distributions.
    kl = measured_kl(calib_lm, held_out, layer, direction, strength)
    return CalibratedStrength(
        calibration=calibration,
        strength=strength,
        measured_kl_median=statistics.median(kl) if kl else float("nan"),
        bound=kl_bound(calibration.a, calibration.lipschitz, strength),
    )


def calibrate_vector(
    model: str, vector: SteeringVector, problems: CalibrationProblems, *, eps: float
) -> tuple[SteeringVector, CalibratedStrength]:
    """``eval --strength auto``: the unit vector at the vector's own layer (see :func:`vector_layer`; a
    vector with directions at other layers too is refused: the bound is for one layer) and the KL-bound
    strength for it."""
    layer = vector_layer(vector)
    if vector.layers != [layer]:
        raise ResidlabError(
            f"--strength auto calibrates one layer's KL bound, and this vector steers layers {vector.layers}.",
            hint=f"give a number for --strength (compress records its strength in the file), or keep layer {layer} "
            "only (SteeringVector.select).",
        )
    unit = vector.select([layer]).normalized()
    return unit, calibrate_strength(model, problems, layer, unit.directions[layer], eps=eps)
