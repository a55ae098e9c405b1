"""The tokens an SAE latent's decoder direction promotes and suppresses (logit lens), shared by the
dashboard and the vector decomposition."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from residlab.saes.base import SparseAutoencoder

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel


def latent_lens(lm: LanguageModel, sae: SparseAutoencoder, latent: int, *, k: int = 8) -> dict[str, Any]:
    """The tokens latent ``latent``'s decoder direction promotes and suppresses (logit lens)."""
    from residlab.analyses.lens import top_tokens

    direction = sae.W_dec[latent].detach().float().to(lm.device)
    return {
        "promoted": [t for t, _ in top_tokens(lm, direction, k)],
        "suppressed": [t for t, _ in top_tokens(lm, direction, k, largest=False)],
    }
