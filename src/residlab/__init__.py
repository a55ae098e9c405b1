"""residlab: read and steer the residual stream of transformer language models."""

from residlab.core.errors import ModelMismatchError, ResidlabError, UnknownArchitectureError
from residlab.core.generation import Generation
from residlab.models.lm import LanguageModel
from residlab.models.loading import load
from residlab.models.registry import DEFAULT_MODEL, PACKAGED_MODELS
from residlab.recipes.contrast_pairs import ContrastPair, read_pairs
from residlab.recipes.extraction import extract
from residlab.vectors.steering_vector import SteeringVector

__version__ = "0.1.0"

__all__ = [
    "ContrastPair",
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "Generation",
    "LanguageModel",
    "ModelMismatchError",
    "ResidlabError",
    "SteeringVector",
    "UnknownArchitectureError",
    "extract",
    "load",
    "read_pairs",
]
