"""ASC stage 3a: where and how strongly to steer, resolved from the config without changing it.

:func:`resolve_steering` is pure: the options, the model's tuned settings and the vector's
separation per layer in, a frozen :class:`SteeringChoice` out (the layer, the requested strength,
and where each came from). The absolute strength follows once the KL bound is calibrated
(:meth:`SteeringChoice.absolute_strength`, also pure).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from residlab.core.errors import ResidlabError
from residlab.core.types import check_layer_index
from residlab.methods.asc.config import Strength
from residlab.models.registry import PackagedModel
from residlab.recipes.calibration import Calibration
from residlab.vectors.steering_vector import SteeringVector

DEFAULT_RELATIVE_STRENGTH = 0.25  # x residual norm, for a model nobody has tuned


@dataclass(frozen=True)
class SteeringChoice:
    """The steering layer and strength, and where each came from.

    ``strength`` is relative (x the mean residual norm at the layer, on the unit vector) or a KL-bound
    mode (``auto``, ``auto-centred``). Sources: ``option`` (given), ``tuned`` (the model's registry
    entry), ``separation`` (best separated middle layer) or ``default``.
    """

    layer: int
    layer_source: str
    strength: float | str
    strength_source: str

    def absolute_strength(self, residual_norm: float, calibration: Calibration | None = None) -> float:
        """The strength on the unit vector: the calibrated bound for a mode, else relative x ``residual_norm``."""
        if not isinstance(self.strength, str):
            return float(self.strength) * residual_norm
        if calibration is None:
            raise ValueError(f"strength {self.strength!r} needs the KL-bound calibration")
        if self.strength == "auto":
            return calibration.strength
        if calibration.strength_centred is None:
            raise ValueError("the calibration has no centred bound")
        return calibration.strength_centred


def choose_layer(separation: Mapping[int, float], num_layers: int) -> int:
    """The best-separated layer among the middle half of the network (early layers carry token
    identity, the last ones are close to the output and steer poorly)."""
    middle = [k for k in separation if num_layers // 4 <= k < 3 * num_layers // 4]
    return max(middle, key=lambda k: separation[k])


def resolve_steering(
    layer: int | None,
    strength: Strength,
    *,
    tuned: PackagedModel | None,
    separation: Mapping[int, float],
    num_layers: int,
    model_name: str = "the model",
) -> SteeringChoice:
    """The layer (given, else the tuned one, else :func:`choose_layer`) and the strength (given, else
    the tuned one, else :data:`DEFAULT_RELATIVE_STRENGTH`)."""
    if layer is not None:
        chosen, layer_source = check_layer_index(layer, num_layers, model_name), "option"
    elif tuned is not None and tuned.asc_layer is not None:
        chosen, layer_source = tuned.asc_layer, "tuned"
    else:
        chosen, layer_source = choose_layer(separation, num_layers), "separation"
    if strength is not None:
        requested, strength_source = strength, "option"
    elif tuned is not None and tuned.asc_strength is not None:
        requested, strength_source = tuned.asc_strength, "tuned"
    else:
        requested, strength_source = DEFAULT_RELATIVE_STRENGTH, "default"
    return SteeringChoice(chosen, layer_source, requested, strength_source)


def vector_layer(vector: SteeringVector) -> int:
    """The layer a vector is meant for: the one it records (``info["layer"]``, compress writes it), else
    its only layer; a multi-layer vector without a recorded layer is an error."""
    recorded = vector.info.get("layer")
    if recorded is not None:
        layer = int(recorded)
        if layer not in vector.directions:
            raise ResidlabError(
                f"the vector records layer {layer} but has directions only for layers {vector.layers}.",
                hint="the file was edited or is damaged; rebuild it with residlab compress.",
            )
        return layer
    if len(vector.layers) == 1:
        return vector.layers[0]
    raise ResidlabError(
        f"the vector has {len(vector.layers)} layers and records no steering layer, so there is no one layer "
        "to calibrate the strength at.",
        hint="use the concise.safetensors that compress writes (it records its layer), or give a number for "
        "--strength.",
    )
