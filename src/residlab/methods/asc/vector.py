"""ASC stage 2: the concise-minus-verbose vector, read with both traces under the same prompt."""

from __future__ import annotations

from collections.abc import Sequence

from residlab.methods.asc import prompts
from residlab.methods.asc.pairs import TracePair
from residlab.models.lm import LanguageModel
from residlab.recipes.extraction import ExtractionResult, contrast_vector


def extract_vector(
    lm: LanguageModel,
    pairs: Sequence[TracePair],
    *,
    read: str = "mean",
    method: str = "mean_diff",
    batch_size: int = 4,
    template: str = prompts.VERBOSE,
) -> ExtractionResult:
    """Mean (or first principal component) of concise - verbose residuals at every layer.

    Sign convention: the vector points from verbose towards concise, so a positive strength is meant
    to shorten outputs (measured, not assumed: see the sweep).
    """
    use_chat = lm.has_chat_template
    heads = [lm.format_prompt(template.format(question=p.question), chat=use_chat) for p in pairs]
    source = pairs[0].concise_source if pairs else ""
    return contrast_vector(
        lm,
        heads,
        [p.concise for p in pairs],
        [p.verbose for p in pairs],
        read=read,
        method=method,
        batch_size=batch_size,
        add_special_tokens=not use_chat,
        source=f"ASC: {method} of concise - verbose, read={read}, {len(pairs)} pairs ({source} concise traces)",
        info={
            "n_pairs": len(pairs),
            "sign": "concise - verbose",
            "concise_source": source,
            "mean_concise_tokens": sum(p.concise_tokens for p in pairs) / max(1, len(pairs)),
            "mean_verbose_tokens": sum(p.verbose_tokens for p in pairs) / max(1, len(pairs)),
        },
    )
