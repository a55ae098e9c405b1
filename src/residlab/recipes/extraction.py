"""Contrastive steering vectors: residual states of positive and negative examples, read at chosen
tokens, and the direction from the negative to the positive ones, at every chosen layer.

Two entry points share one reader: :func:`extract` (any contrast pairs: texts or chats, optionally as
completions of a prompt, read at the last token, a mean over a span or a token index, batched; what
``residlab extract`` runs) and :func:`contrast_vector` (completions of rendered prompts, every layer;
the ASC method builds its concise-vs-verbose vector on it). Directions come from :data:`AGGREGATORS`, a
registry of plain callables ``(positive [n, d], negative [n, d]) -> [d]``: a new aggregator is one
function. The separation of every layer is a cross-validated effect size, so layers can be compared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from residlab.core.errors import ResidlabError
from residlab.core.generation import uses_chat_template
from residlab.core.registry import lookup
from residlab.models.lm import LanguageModel
from residlab.recipes.contrast_pairs import ContrastPair, ReadSpec, as_pairs
from residlab.vectors.steering_vector import SteeringVector

Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (positive [n, d], negative [n, d]) -> [d]


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean of the paired differences ``positive - negative``."""
    return (positive - negative).mean(dim=0)


def first_principal_component(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """First principal component of the paired differences, scaled to the mean difference's
    projection on it and oriented like the mean difference."""
    diff = positive - negative
    mean = diff.mean(dim=0)
    _, _, vh = torch.linalg.svd(diff - mean, full_matrices=False)
    pc = vh[0]
    projection = float(mean @ pc)
    return pc * projection if projection != 0 else pc


def logistic_direction(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The weight vector of a logistic regression telling positive from negative states, scaled to the
    mean difference's projection on it and oriented like the mean difference.

    Fitted in float64 with L-BFGS on the states centred and divided by their mean norm, with an L2
    penalty of ``1/(2n) ||w||^2`` per sample (scikit-learn's ``C = 1``): deterministic, no extra
    dependency. Useful when the classes differ in spread as well as in mean.
    """
    states = torch.cat([positive, negative]).to(torch.float64).clone()  # a plain tensor, not an inference one
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).to(torch.float64)
    states = (states - states.mean(dim=0)) / states.norm(dim=-1).mean().clamp_min(1e-12)
    weight = torch.zeros(states.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    penalty = 0.5 / len(labels)
    with torch.inference_mode(False), torch.enable_grad():
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
        )

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            logits = states @ weight + bias
            value = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + penalty * (weight @ weight)
            value.backward()
            return value

        optimizer.step(loss)
    direction = weight.detach().to(torch.float32)
    mean = (positive.mean(dim=0) - negative.mean(dim=0)).float()
    norm = float(direction.norm())
    if norm == 0:
        return mean
    unit = direction / norm
    projection = float(mean @ unit)
    return unit * projection if projection != 0 else unit


AGGREGATORS: dict[str, Aggregator] = {
    "mean_diff": mean_difference,
    "pca": first_principal_component,
    "logistic": logistic_direction,
}


def aggregator(method: str | Aggregator) -> Aggregator:
    """An aggregator by name (:data:`AGGREGATORS`, where a user may add one), or a callable passed through."""
    return lookup(
        AGGREGATORS,
        method,
        what="method",
        extend_hint="add a function (positive, negative) -> direction to residlab.recipes.extraction.AGGREGATORS",
    )


@dataclass(frozen=True)
class ExtractionResult:
    vector: SteeringVector  # every layer
    separation: dict[int, float]  # cross-validated effect size of the direction, per layer
    residual_norm: dict[int, float]  # mean norm of the residual states read, per layer
    read: str
    method: str
    n_pairs: int

    @property
    def best_layer(self) -> int:
        return max(self.separation, key=self.separation.__getitem__)

    def relative_norm(self, layer: int) -> float:
        return self.vector.norm(layer) / self.residual_norm[layer]


@dataclass(frozen=True)
class ReadPosition:
    """Which tokens of an example are read: their states are averaged over ``tokens[start:stop]``
    (a Python slice of the example's tokens, negative from its end).

    Written as ``last`` (``[-1:]``), ``mean`` (every token), ``first:N`` (the first N, fewer if the
    example is shorter), a token index ``i`` (``[i:i+1]``) or a span ``start:stop`` / ``[start, stop]``.
    """

    start: int = 0
    stop: int | None = None
    text: str = "mean"

    @classmethod
    def parse(cls, spec: ReadSpec | ReadPosition) -> ReadPosition:
        """A read position from how a user writes it (see the class docstring), or a clear error."""
        if isinstance(spec, ReadPosition):
            return spec
        if isinstance(spec, bool):
            raise _bad_read(spec)
        if isinstance(spec, int):
            return cls(spec, spec + 1 if spec != -1 else None, str(spec))
        if isinstance(spec, str):
            return _parse_read_text(spec)
        if isinstance(spec, Sequence) and len(spec) == 2 and all(isinstance(i, int) for i in spec):
            return cls(int(spec[0]), int(spec[1]), f"{spec[0]}:{spec[1]}")
        raise _bad_read(spec)

    def tokens(self, length: int) -> range:
        """The token positions read in an example of ``length`` tokens; an error if none."""
        chosen = range(length)[self.start : self.stop]
        if not chosen:
            raise ResidlabError(
                f"read position {self.text} selects no token of an example of {length} tokens.",
                hint="use last, mean, an index inside every example, or a span that every example covers.",
            )
        return chosen


def _bad_read(spec: object) -> ResidlabError:
    return ResidlabError(
        f"unknown read mode {spec!r}.",
        hint="use last, mean, first:N, a token index such as -2, or a span start:stop such as 0:8.",
    )


def _parse_read_text(text: str) -> ReadPosition:
    if text == "last":
        return ReadPosition(-1, None, text)
    if text == "mean":
        return ReadPosition(0, None, text)
    if text.startswith("first:"):
        count = text[6:]
        if count.isdigit() and int(count) > 0:
            return ReadPosition(0, int(count), text)
        raise _bad_read(text)
    try:
        if ":" in text:
            start, stop = text.split(":")
            return ReadPosition(int(start) if start else 0, int(stop) if stop else None, text)
        return ReadPosition.parse(int(text))
    except ValueError:
        raise _bad_read(text) from None


@dataclass(frozen=True)
class ReadRequest:
    """One text to run: its token ids, where its example starts (after a prompt) and what is read."""

    token_ids: tuple[int, ...]
    first: int
    read: ReadPosition


def read_states(
    lm: LanguageModel,
    requests: Sequence[ReadRequest],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "reading states",
) -> torch.Tensor:
    """[requests, layers, d] float32: each request's residual after each block in ``layers``, averaged
    over the tokens its read position selects. Requests run in order, ``batch_size`` at a time,
    left-padded, every layer recorded in one pass; ``progress`` shows a bar labelled ``desc``."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="text")
    out = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        batch = lm.pad([r.token_ids for r in chunk])
        with lm.record(layers=layers, positions="all") as rec:
            lm.forward(batch)
        stacked = torch.stack([rec[layer] for layer in layers], dim=1).float()  # [b, layers, t, d]
        width = batch.input_ids.shape[1]
        for row, request in enumerate(chunk):
            first = width - len(request.token_ids) + request.first  # left padding: real tokens are the last n
            if first >= width:
                raise ResidlabError("an example is empty after tokenisation.", hint="drop empty examples.")
            chosen = request.read.tokens(width - first)
            out.append(stacked[row, :, first + chosen.start : first + chosen.stop, :].mean(dim=1))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return torch.stack(out)


def completion_states(
    lm: LanguageModel,
    heads: Sequence[str],
    completions: Sequence[str],
    *,
    read: str = "mean",
    batch_size: int = 4,
    add_special_tokens: bool = False,
    progress: bool = False,
    desc: str = "reading states",
) -> torch.Tensor:
    """[texts, layers, d] float32: each head+completion's residual after every block, at the
    completion's last token (``last``), averaged over its tokens (``mean``) or over its first N tokens
    (``first:N``). ``heads`` are prompts already rendered as the model sees them; ``progress`` shows a
    bar labelled ``desc``."""
    position = ReadPosition.parse(read)
    if position.text not in ("mean", "last") and not position.text.startswith("first:"):
        raise _bad_read(read)
    requests = []
    for head, completion in zip(heads, completions, strict=True):
        ids = lm.tokenizer(head + completion, add_special_tokens=add_special_tokens)["input_ids"]
        first = len(lm.tokenizer(head, add_special_tokens=add_special_tokens)["input_ids"])
        requests.append(ReadRequest(tuple(ids), first, position))
    return read_states(lm, requests, range(lm.num_layers), batch_size=batch_size, progress=progress, desc=desc)


def cross_validated_separation(positive: torch.Tensor, negative: torch.Tensor, aggregate: Aggregator) -> float:
    """Two-fold cross-validated Cohen's d of projections onto the direction from the other fold."""
    n = positive.shape[0]
    if n < 4:
        return float("nan")
    folds = [torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1]
    scores = []
    for train, test in (folds, folds[::-1]):
        direction = aggregate(positive[train], negative[train])
        direction = direction / direction.norm().clamp_min(1e-12)
        p, q = positive[test] @ direction, negative[test] @ direction
        pooled = ((p.var() + q.var()) / 2).sqrt().clamp_min(1e-12)
        scores.append(float((p.mean() - q.mean()) / pooled))
    return sum(scores) / len(scores)


@dataclass(frozen=True)
class LayerStatistics:
    """Per layer: the direction, its cross-validated separation and the mean norm of the states read."""

    directions: dict[int, torch.Tensor]
    separation: dict[int, float]
    residual_norm: dict[int, float]

    def info(self) -> dict[str, Any]:
        """What a vector's metadata records of them."""
        return {
            "residual_norm": {str(k): round(v, 4) for k, v in self.residual_norm.items()},
            "separation": {str(k): round(v, 4) for k, v in self.separation.items()},
        }


def layer_statistics(
    positive: torch.Tensor, negative: torch.Tensor, layers: Sequence[int], aggregate: Aggregator
) -> LayerStatistics:
    """Directions and statistics from states [pairs, len(layers), d] read at ``layers``."""
    directions, separation, residual = {}, {}, {}
    for index, layer in enumerate(layers):
        p, q = positive[:, index], negative[:, index]
        directions[layer] = aggregate(p, q)
        separation[layer] = cross_validated_separation(p, q, aggregate)
        residual[layer] = float(torch.cat([p, q]).norm(dim=-1).mean())
    return LayerStatistics(directions, separation, residual)


def contrast_vector(
    lm: LanguageModel,
    heads: Sequence[str],
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    read: str = "mean",
    method: str = "mean_diff",
    batch_size: int = 4,
    add_special_tokens: bool = False,
    source: str = "",
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> ExtractionResult:
    """The direction from ``negative`` to ``positive`` completions of the same ``heads``, at every layer
    (``progress``: a bar for each side's forward passes, minutes on a CPU for a hundred pairs)."""
    aggregate = aggregator(method)
    if not heads:
        raise ResidlabError(
            "no pairs to extract a vector from.",
            hint="use more calibration problems, or relax the pair filter (--keep all).",
        )
    kwargs: dict[str, Any] = dict(read=read, batch_size=batch_size, add_special_tokens=add_special_tokens)
    pos = completion_states(lm, heads, positive, **kwargs, progress=progress, desc="reading states (1/2)")
    neg = completion_states(lm, heads, negative, **kwargs, progress=progress, desc="reading states (2/2)")
    stats = layer_statistics(pos, neg, range(lm.num_layers), aggregate)
    vector = SteeringVector.from_layers(
        stats.directions,
        model=lm,
        source=source,
        info={**(info or {}), "read": read, "method": method, **stats.info()},
    )
    return ExtractionResult(vector, stats.separation, stats.residual_norm, read, method, len(heads))


def _render(lm: LanguageModel, example: Any) -> tuple[str, bool]:
    """``example`` as the model reads it, and whether tokenising it should add special tokens (plain
    text: yes, as the tokenizer does by default; a rendered chat template has them already)."""
    if isinstance(example, str):
        return example, True
    if not lm.has_chat_template:
        raise ResidlabError(
            f"{lm.name} has no chat template, so chat messages cannot be rendered.", hint="give texts instead."
        )
    messages = [dict(m) for m in example]
    open_reply = messages[-1]["role"] == "assistant"
    text = lm.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not open_reply, continue_final_message=open_reply
    )
    return str(text), False


def pair_requests(
    lm: LanguageModel, pairs: Sequence[ContrastPair], read: ReadSpec, *, chat: bool | None = None
) -> tuple[list[ReadRequest], list[ReadRequest]]:
    """Tokenised positive and negative examples of ``pairs``, each with its read position (counted in
    the example's own tokens: after the prompt, when there is one)."""
    default = ReadPosition.parse(read)
    sides: tuple[list[ReadRequest], list[ReadRequest]] = ([], [])
    for pair in pairs:
        position = default if pair.read is None else ReadPosition.parse(pair.read)
        examples = (pair.positive, pair.negative)
        if pair.prompt is None:
            for side, example in zip(sides, examples, strict=True):
                text, special = _render(lm, example)
                side.append(
                    ReadRequest(tuple(lm.tokenizer(text, add_special_tokens=special)["input_ids"]), 0, position)
                )
            continue
        head = lm.format_prompt(pair.prompt, chat=chat)
        special = isinstance(pair.prompt, str) and not uses_chat_template(lm.tokenizer, chat)  # plain text
        first = len(lm.tokenizer(head, add_special_tokens=special)["input_ids"])
        for side, completion in zip(sides, examples, strict=True):
            ids = lm.tokenizer(head + str(completion), add_special_tokens=special)["input_ids"]
            side.append(ReadRequest(tuple(ids), first, position))
    return sides


def extract(
    lm: LanguageModel,
    pairs: Iterable[ContrastPair | Sequence[Any] | Mapping[str, Any]],
    *,
    layers: Iterable[int] | None = None,
    method: str | Aggregator = "mean_diff",
    read: ReadSpec = "last",
    batch_size: int = 8,
    chat: bool | None = None,
    position_rule: str = "prompt_last+generated",
    source: str = "",
    progress: bool = False,
) -> SteeringVector:
    """A steering vector from contrast pairs: at each of ``layers`` (default: all), the direction from
    the negative to the positive examples' residual states, aggregated by ``method`` (``mean_diff``,
    ``pca``, ``logistic``, a name added to :data:`AGGREGATORS`, or a callable).

    ``pairs`` are ``(positive, negative)`` tuples of texts or chats, :class:`ContrastPair` objects
    (optionally completions of a shared prompt, with their own read position), or mappings with the
    pairs file's keys (:func:`~residlab.recipes.contrast_pairs.read_pairs`). ``read`` is where each
    example is read (:class:`ReadPosition`: ``last`` by default, as steering-vectors and repeng read).
    ``chat`` renders prompts through the chat template (default: when the tokenizer has one).
    The vector records ``position_rule`` (what steering with it uses unless told otherwise) and, in its
    ``info``, the method, read position, pair count and per-layer separation and residual norm.
    """
    chosen = sorted({lm.check_layer(x) for x in layers}) if layers is not None else list(range(lm.num_layers))
    if not chosen:
        raise ResidlabError("no layer to extract at was given.", hint="pass at least one layer.")
    aggregate = aggregator(method)
    contrast = as_pairs(pairs)
    positive, negative = pair_requests(lm, contrast, read, chat=chat)
    states = read_states(lm, positive + negative, chosen, batch_size=batch_size, progress=progress)
    stats = layer_statistics(states[: len(contrast)], states[len(contrast) :], chosen, aggregate)
    name = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    read_text = ReadPosition.parse(read).text
    return SteeringVector.from_layers(
        stats.directions,
        model=lm,
        position_rule=position_rule,
        source=source or f"{name} of positive - negative over {len(contrast)} contrast pairs, read {read_text}",
        info={
            "method": name,
            "read": read_text,
            "n_pairs": len(contrast),
            "sign": "positive - negative",
            **stats.info(),
        },
    )
