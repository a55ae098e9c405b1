"""Gradients averaged along the input path from the corrupted prompt to the clean one.

AtP and RelP take the metric's (rule-shaped) gradient at the corrupted run and extrapolate it linearly
to the clean activations. Where the network is far from linear between the two runs, one point is not
enough: on IOI, changing the repeated name switches which earlier name the duplicate-token and
S-inhibition heads read, a softmax that moves from one position to another, and the gradient at either
end sees little of it (on the default model, patching the residual at that token in layers 0-13 moves
the logit difference by 10.1; RelP says 3.1 to 3.6 and AtP -0.4 to -1.0: benchmarks/results/patching.json,
``relp_misses``).

With ``steps`` N > 0 the gradient is instead averaged over the midpoints ``(k + 1/2) / N`` of the
straight line between the corrupted and the clean token embeddings (integrated gradients at the input,
as in EAP-IG, Hanna et al. 2024), each point one forward and one backward pass; the deltas stay
``clean - corrupted`` of each site. N = 0 is the plain estimate at the corrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from residlab.core.errors import ResidlabError
from residlab.interventions.hooks import HookSet

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


def path_points(steps: int) -> tuple[float, ...]:
    """Where on the path (0 = corrupted, 1 = clean) the gradients are taken: ``(0,)`` for 0 steps, else
    the ``steps`` midpoints of equal segments."""
    if steps < 0:
        raise ResidlabError(
            f"the path steps (--ig-steps) must be 0 or more, got {steps}.", hint="use 0 (plain AtP/RelP) or e.g. 16."
        )
    return (0.0,) if steps == 0 else tuple((k + 0.5) / steps for k in range(steps))


@contextmanager
def embeddings_between(
    lm: LanguageModel, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, alpha: float
) -> Iterator[None]:
    """While the block runs, the input embeddings of every forward pass are
    ``(1 - alpha) * embed(corrupted_ids) + alpha * embed(clean_ids)`` (the pass must be given ids of the
    same shape); gradients still flow into the embedding output as if it were the model's own."""
    if clean_ids.shape != corrupted_ids.shape:
        raise ResidlabError(
            f"clean and corrupted ids differ in shape ({tuple(clean_ids.shape)} vs {tuple(corrupted_ids.shape)}).",
            hint="path gradients need pairs whose prompts have the same number of tokens (encode_pairs pads them).",
        )
    embed: torch.nn.Module = lm.model.get_input_embeddings()  # type: ignore[operator]
    with torch.no_grad():
        start, end = embed(corrupted_ids), embed(clean_ids)
        mixed = (start.float() + alpha * (end.float() - start.float())).to(start.dtype)

    def between(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape != mixed.shape:
            raise ResidlabError(
                "a forward pass inside embeddings_between ran other prompts than the path's.",
                hint="run only the corrupted ids of the same batch while the path is set.",
            )
        return output + (mixed.to(output.device) - output).detach()  # the value is the mix, the graph the model's

    hooks = HookSet()
    try:
        hooks.forward(embed, between)
        yield
    finally:
        hooks.remove_all()
