"""ASC stage 2, prompt-contrast variant: the vector from the prompts alone, no traces generated.

For each train question, the residual states of the same question under the concise instruction
and under the plain (step by step) one are read at the tokens both rendered prompts end with (the
chat template's assistant header, the positions where generation is about to start). Those tokens
are identical in both texts, so the difference is what the instruction did to the model's state,
not the instruction's own words. The vector is the mean (or another aggregator) of concise -
plain at every layer, with the same per-layer separation and residual norms as the trace vector.
"""

from __future__ import annotations

from collections.abc import Sequence

from residlab.core.errors import ResidlabError
from residlab.data import Problem
from residlab.methods.asc import prompts
from residlab.methods.asc.pairs import PairStats
from residlab.models.lm import LanguageModel
from residlab.recipes.extraction import (
    ExtractionResult,
    ReadPosition,
    ReadRequest,
    aggregator,
    layer_statistics,
    read_states,
)
from residlab.vectors.steering_vector import SteeringVector


def shared_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` end with in common."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def prompt_requests(
    lm: LanguageModel, problems: Sequence[Problem], template: str
) -> tuple[list[ReadRequest], list[ReadRequest]]:
    """(concise, plain) read requests: each rendered prompt, read over the tail it shares with the other."""
    use_chat = lm.has_chat_template
    concise, plain = [], []
    for problem in problems:
        texts = [
            lm.format_prompt(t.format(question=problem.question), chat=use_chat) for t in (template, prompts.VERBOSE)
        ]
        ids = [tuple(lm.tokenizer(t, add_special_tokens=not use_chat)["input_ids"]) for t in texts]
        tail = shared_suffix(*ids)
        if tail == 0:
            # No shared tail (no chat template and the prompts end differently): read the last token.
            tail = 1
        read = ReadPosition(-tail, None, f"last {tail} (shared tail)")
        concise.append(ReadRequest(ids[0], 0, read))
        plain.append(ReadRequest(ids[1], 0, read))
    return concise, plain


def prompt_contrast_vector(
    lm: LanguageModel,
    problems: Sequence[Problem],
    *,
    template: str = prompts.CONCISE,
    method: str = "mean_diff",
    batch_size: int = 4,
) -> tuple[ExtractionResult, PairStats]:
    """Concise-instruction minus plain-instruction residuals at every layer (see the module docstring),
    and the prompt pairs' statistics (their token counts are the prompts', as no trace exists)."""
    if len(problems) < 2:
        raise ResidlabError(
            f"prompt-contrast needs at least two questions, got {len(problems)}.", hint="raise --pairs."
        )
    concise, plain = prompt_requests(lm, problems, template)
    states = read_states(lm, concise + plain, range(lm.num_layers), batch_size=batch_size)
    stats = layer_statistics(states[: len(concise)], states[len(concise) :], range(lm.num_layers), aggregator(method))
    n = len(problems)
    pair_stats = PairStats(
        n_problems=n,
        n_pairs=n,
        dropped={},
        mean_verbose_tokens=sum(len(r.token_ids) for r in plain) / n,
        mean_concise_tokens=sum(len(r.token_ids) for r in concise) / n,
    )
    vector = SteeringVector.from_layers(
        stats.directions,
        model=lm,
        source=f"ASC: {method} of concise-prompt - plain-prompt states at the shared prompt tail, {n} questions",
        info={
            "n_pairs": n,
            "sign": "concise prompt - plain prompt",
            "concise_source": "prompt-contrast",
            "read": "shared prompt tail",
            "method": method,
            **stats.info(),
        },
    )
    return ExtractionResult(vector, stats.separation, stats.residual_norm, "shared prompt tail", method, n), pair_stats
