"""The logit lens: read any residual-stream state (or a steering direction) through the model's own head.

``logit_lens(lm, h)`` = unembed(final_norm(h)) (plus the family's final logit soft-capping, if any),
so applied to the output of the last block it gives exactly the model's logits. Applied to an
earlier layer it shows what the model "would predict" if the remaining blocks did nothing
(nostalgebraist 2020). This is the plain lens; a *tuned* lens (Belrose et al. 2023) would first
pass ``h`` through a per-layer affine map trained to match the final output, which residlab does
not train.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from residlab.analyses.common import final_norm, unembed
from residlab.core.errors import ResidlabError

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel
    from residlab.vectors.steering_vector import SteeringVector


@torch.inference_mode()
def logit_lens(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (float32, ``[..., vocab]``) of final norm + unembedding applied to ``hidden`` ``[..., d_model]``."""
    if hidden.shape[-1] != lm.hidden_size:
        raise ResidlabError(
            f"the logit lens needs vectors of size {lm.hidden_size} (the model's hidden size), got {hidden.shape[-1]}.",
            hint="pass residual-stream states recorded from this model (site 'block' or 'block_input').",
        )
    return unembed(lm, final_norm(lm, hidden.to(lm.device)))


@torch.inference_mode()
def lens_log_probs(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (float32) of the logit lens applied to ``hidden``."""
    return torch.log_softmax(logit_lens(lm, hidden), dim=-1)


def top_tokens(
    lm: LanguageModel,
    vector: SteeringVector | torch.Tensor,
    k: int = 10,
    *,
    layer: int | None = None,
    largest: bool = True,
) -> list[tuple[str, float]]:
    """The ``k`` tokens whose logits final norm + unembedding of ``vector`` raises most (``largest``)
    or lowers most, with those logits.

    ``vector`` is a raw ``[d_model]`` tensor or a :class:`SteeringVector` (its direction at ``layer``;
    a one-layer vector needs no ``layer``). Use it to see which tokens a steering direction promotes
    (an ASC vector should favour tokens of terse reasoning) and, with ``largest=False``, suppresses.
    For a direction (not a state) the final norm mostly rescales (RMSNorm is scale-invariant);
    LayerNorm families also centre it and add their bias.
    """
    from residlab.vectors.steering_vector import SteeringVector

    if isinstance(vector, SteeringVector):
        vector.check_compatible(lm)
        layers = sorted(vector.directions)
        if layer is None:
            if len(layers) != 1:
                raise ResidlabError(
                    f"the steering vector has {len(layers)} layers ({layers}); say which one to read.",
                    hint="pass layer=... (one of the vector's layers).",
                )
            layer = layers[0]
        index = lm.check_layer(layer)
        if index not in vector.directions:
            raise ResidlabError(
                f"the steering vector has no direction for layer {layer}.", hint=f"use one of {layers}."
            )
        tensor = vector.directions[index]
    else:
        tensor = torch.as_tensor(vector)
    if tensor.dim() != 1:
        raise ResidlabError(
            f"top_tokens reads one vector, got shape {tuple(tensor.shape)}.",
            hint="pass a [d_model] tensor (e.g. rec[layer][0]) or a steering vector.",
        )
    if k < 1:
        raise ResidlabError(f"k must be at least 1, got {k}.", hint="ask for one token or more.")
    logits = logit_lens(lm, tensor.float())
    values, ids = logits.topk(min(k, logits.shape[-1]), largest=largest)
    return [(lm.tokenizer.decode([i]), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
