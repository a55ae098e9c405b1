"""Where in each sequence an intervention acts, independent of padding and of the KV cache.

Every forward pass is described by a :class:`ForwardContext`: for each batch row and each input
token, its *real* position in the sequence (0 = first non-padding token, -1 = padding), and each
row's prompt length. Rules are defined on real positions, so a rule gives the same answer whether
the model recomputes the whole sequence or feeds one new token against a KV cache, and whatever
the left padding of the row. (A hook that only looks at "the last position of this forward pass"
silently changes meaning when the cache is switched on or off.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from residlab.core.errors import ResidlabError

STEERING_RULES = ("all", "prompt", "generated", "prompt_last+generated")
RECORDING_RULES = ("all", "last")

PositionRule = str | Sequence[int]


@dataclass(frozen=True)
class SteeringPhases:
    """Whether a steering rule acts in each phase of a generation: the prompt minus its last token,
    the last prompt token (whose logits give the first generated token), and the generated tokens.

    An engine that can only switch steering on and off between these phases (llama.cpp's
    context-wide control vector) runs exactly the rules that decompose this way
    (:data:`PHASED_RULES`); tests check the table against :func:`steering_mask`.
    """

    prompt_body: bool
    prompt_last: bool
    generated: bool


NO_STEERING = SteeringPhases(False, False, False)
PHASED_RULES: dict[str, SteeringPhases] = {
    "all": SteeringPhases(True, True, True),
    "prompt": SteeringPhases(True, True, False),
    "generated": SteeringPhases(False, False, True),
    "prompt_last+generated": SteeringPhases(False, True, True),
}


def steering_phases(rule: PositionRule) -> SteeringPhases | None:
    """``rule`` as on/off per generation phase, or ``None`` when it is not expressible that way
    (token-index rules select positions inside the prompt body)."""
    return PHASED_RULES.get(rule) if isinstance(rule, str) else None


@dataclass(frozen=True)
class ForwardContext:
    """What one forward pass covers.

    positions: [batch, tokens] real position of each input token in its row, -1 for padding.
    prompt_lengths: [batch] number of real prompt tokens per row (set at the pass that starts a
        sequence, i.e. with an empty cache; later passes are generated tokens).
    row_index: [batch] which of the caller's rows each batch row is (for per-row vectors when a
        long list of prompts is split into sorted sub-batches).
    """

    positions: torch.Tensor
    prompt_lengths: torch.Tensor
    row_index: torch.Tensor

    @property
    def real(self) -> torch.Tensor:
        return self.positions >= 0

    def to(self, device: torch.device) -> ForwardContext:
        """The same context on ``device`` (itself when already there): a model split over several
        devices runs each block on its own, and a hook works where its block's hidden state is."""
        if self.positions.device == device:
            return self
        return ForwardContext(self.positions.to(device), self.prompt_lengths.to(device), self.row_index.to(device))


def validate_rule(rule: PositionRule, allowed: Sequence[str]) -> PositionRule:
    """Return ``rule`` normalised (indices as a tuple), or raise a clear error."""
    if isinstance(rule, str):
        if rule not in allowed:
            raise ResidlabError(
                f"unknown position rule {rule!r}.",
                hint=f"use one of {', '.join(allowed)}, or a list of token indices such as [0, -1].",
            )
        return rule
    try:
        indices = tuple(int(i) for i in rule)
    except (TypeError, ValueError):
        raise ResidlabError(
            f"position rule {rule!r} is neither a rule name nor a list of integers.",
            hint=f"use one of {', '.join(allowed)}, or a list of token indices such as [0, -1].",
        ) from None
    if not indices:
        raise ResidlabError("an empty list of positions selects nothing.", hint="give at least one index.")
    return indices


def parse_rule(text: str, allowed: Sequence[str]) -> PositionRule:
    """Parse a rule from the command line: a name, or comma-separated indices (``0,-1``)."""
    if text in allowed:
        return text
    try:
        return validate_rule([int(x) for x in text.split(",")], allowed)
    except ValueError:
        return validate_rule(text, allowed)


def recorded_rule(rules: Iterable[str]) -> PositionRule:
    """The steering rule that vectors record (``SteeringVector.position_rule``), parsed: what steering
    uses when no rule is given, so a file made for another tool's rule (a llama.cpp or repeng control
    vector: ``all``) steers as that tool would. Vectors that record different rules need an explicit one."""
    distinct = sorted(set(rules))
    if len(distinct) != 1:
        raise ResidlabError(
            f"the steering vectors record different position rules ({', '.join(distinct) or 'none'}).",
            hint="pass the rule to use for all of them (positions=... / --positions).",
        )
    return parse_rule(distinct[0], STEERING_RULES)


def _resolve_indices(indices: tuple[int, ...], prompt_lengths: torch.Tensor) -> torch.Tensor:
    """[batch, k] absolute real positions; negative indices count back from the prompt's end."""
    idx = torch.tensor(indices, device=prompt_lengths.device).unsqueeze(0)
    return torch.where(idx < 0, prompt_lengths.unsqueeze(1) + idx, idx)


def steering_mask(rule: PositionRule, ctx: ForwardContext) -> torch.Tensor:
    """[batch, tokens] bool: where a steering rule adds its vector in this forward pass."""
    pos = ctx.positions
    prompt_len = ctx.prompt_lengths.unsqueeze(1)
    if rule == "all":
        return ctx.real
    if rule == "prompt":
        return ctx.real & (pos < prompt_len)
    if rule == "generated":
        return pos >= prompt_len
    if rule == "prompt_last+generated":
        return ctx.real & (pos >= prompt_len - 1)
    wanted = _resolve_indices(rule, ctx.prompt_lengths)  # type: ignore[arg-type]
    outside = (wanted < 0) | (wanted >= prompt_len)
    if bool(outside.any()):
        row, k = outside.nonzero()[0].tolist()
        raise ResidlabError(
            f"steering position {rule[k]} is outside the prompt of batch row {row}, which has "
            f"{int(ctx.prompt_lengths[row])} tokens: it would steer nothing.",
            hint="token indices count prompt tokens from 0, or back from the prompt's end with -1; "
            "use 'generated' or 'all' to steer generated tokens.",
        )
    return ctx.real & (pos.unsqueeze(-1) == wanted.unsqueeze(1)).any(-1)


def select_positions(hidden: torch.Tensor, rule: PositionRule, ctx: ForwardContext) -> torch.Tensor:
    """Pick recorded positions from ``hidden`` [batch, tokens, d].

    ``all`` -> [batch, tokens, d] (padding included; see ``ForwardContext.positions``);
    ``last`` -> [batch, d], the last real token of each row in this pass;
    indices -> [batch, k, d], real positions (negative from the end of the prompt).
    """
    if rule == "all":
        return hidden
    if rule == "last":
        last = ctx.positions.argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    wanted = _resolve_indices(rule, ctx.prompt_lengths)  # type: ignore[arg-type]
    hit = ctx.positions.unsqueeze(-1) == wanted.unsqueeze(1)  # [batch, tokens, k]
    found = hit.any(dim=1)
    if not bool(found.all()):
        row, k = (~found).nonzero()[0].tolist()
        raise ResidlabError(
            f"position {rule[k]} does not exist in batch row {row} of this forward pass.",
            hint="record with positions='all' or pick indices that every text has.",
        )
    token_index = hit.float().argmax(dim=1)  # [batch, k]
    gather = token_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, gather)
