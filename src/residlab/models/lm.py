"""``LanguageModel``: a Hugging Face causal LM plus its tokenizer, architecture map and interventions.

It never changes the wrapped model permanently: interventions are hooks that live only inside a
``with`` block, and tokenisation pads by hand instead of mutating the tokenizer's settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from residlab.core.errors import ResidlabError
from residlab.core.generation import (
    DecodedBatch,
    Generation,
    Prompt,
    PromptBatch,
    SamplingParams,
    eos_token_ids,
    generate_batched,
    has_chat_template,
    pick_next_tokens,
    render_prompt,
)
from residlab.core.types import check_layer_index
from residlab.interventions.edit import Edit, EditFn, skip_blocks
from residlab.interventions.operators import SteeringOperator
from residlab.interventions.positions import PositionRule, recorded_rule
from residlab.interventions.record import Recording
from residlab.interventions.schedules import ScheduleStep, StrengthSchedule
from residlab.interventions.steer import Steering
from residlab.interventions.tracking import ForwardTracker
from residlab.models.architectures import ArchitectureMap, architecture_for, get_module
from residlab.models.devices import input_device
from residlab.models.registry import packaged_model

if TYPE_CHECKING:
    from residlab.vectors.steering_vector import SteeringVector


@dataclass(frozen=True)
class Batch:
    """Left-padded token ids with their attention mask."""

    input_ids: torch.Tensor  # [batch, tokens]
    attention_mask: torch.Tensor  # [batch, tokens], 0 = padding

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)


class LanguageModel:
    """A causal LM ready to record and steer. Build one with :func:`residlab.load` or directly
    from a transformers model and tokenizer (which are then used as they are, never modified)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str, source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.arch: ArchitectureMap = architecture_for(model)
        self.decoder = get_module(model, self.arch.decoder)
        self.blocks: list[torch.nn.Module] = list(get_module(model, self.arch.blocks))  # type: ignore[call-overload]
        self.tracker = ForwardTracker(self.decoder)
        params = inspect.signature(type(model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._accepts_logits_to_keep = "logits_to_keep" in params

    # -- facts ------------------------------------------------------------------------------
    @property
    def accepts_logits_to_keep(self) -> bool:
        """Whether the model's forward can unembed only the last positions (Hugging Face ``logits_to_keep``)."""
        return self._accepts_logits_to_keep

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def model_type(self) -> str:
        """The architecture as Hugging Face names it (``config.model_type``: qwen2, llama, gemma3_text...)."""
        return str(getattr(self.model.config, "model_type", "") or "")

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)  # type: ignore[union-attr, arg-type]

    @property
    def device(self) -> torch.device:
        """Where inputs go (the input embedding's device; under a device map, later blocks may run elsewhere)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative counts from the end) and return it non-negative."""
        return check_layer_index(layer, self.num_layers, self.name)

    def block_part(self, layer: int, part: str) -> torch.nn.Module:
        """Block ``layer`` (``part == ""``) or one of its parts by :class:`ArchitectureMap` field name."""
        block = self.blocks[self.check_layer(layer)]
        return block if not part else get_module(block, self._mapped(part))

    def model_part(self, part: str) -> torch.nn.Module:
        """A module of the whole model by :class:`ArchitectureMap` field name (``final_norm``, ``unembed``)."""
        return get_module(self.model, self._mapped(part))

    def _mapped(self, part: str) -> str:
        path = getattr(self.arch, part)
        if not path:
            how = "its guessed map found none" if self.arch.guessed else "the family has none"
            raise ResidlabError(
                f"{self.name} ({self.arch.family}) has no {part} module: {how}.",
                hint="use another site (block, block_input, attn, mlp...), or add the path to the family's "
                "ArchitectureMap in residlab/models/architectures.py.",
            )
        return str(path)

    @property
    def known_names(self) -> tuple[str, ...]:
        """Every name a vector made for this model may record: its own name and, for a packaged
        model, the upstream Hugging Face id (and the other way round)."""
        packaged = packaged_model(self.name)
        return (self.name,) if packaged is None else (self.name, packaged.name, packaged.hf_id)

    @property
    def pad_token_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_token_ids(self) -> list[int]:
        return eos_token_ids(self.tokenizer, getattr(self.model, "generation_config", None), self.model.config)

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    # -- text -> tokens -----------------------------------------------------------------------
    def format_prompt(self, prompt: Prompt, chat: bool | None = None, system: str | None = None) -> str:
        """Render a prompt as the model sees it: through the chat template if ``chat`` (default: when
        the tokenizer has one), else as plain text."""
        return render_prompt(self.tokenizer, prompt, chat=chat, system=system, model_name=self.name)

    def encode(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> Batch:
        """Tokenise already-formatted texts and pad them on the left."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ResidlabError("no texts were given.", hint="pass at least one text.")
        rows = [self.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
        return self.pad(rows)

    def pad(self, rows: Sequence[Sequence[int]]) -> Batch:
        """Left-pad token id lists into a :class:`Batch`."""
        width = max(len(r) for r in rows)
        if width == 0:
            raise ResidlabError("every text tokenised to nothing.", hint="pass non-empty texts.")
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
        return Batch(ids.to(self.device), mask.to(self.device))

    # -- running ------------------------------------------------------------------------------
    def _call(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, last_only: bool) -> Any:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": cache is not False,
        }
        if cache not in (None, False):
            kwargs[self._cache_kwarg] = cache
        if last_only and self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)

    @torch.inference_mode()
    def forward(self, texts: Sequence[str] | Batch, *, add_special_tokens: bool = True) -> torch.Tensor:
        """Run texts (or a :class:`Batch`) through the model without a cache; return logits
        [batch, tokens, vocab] (left-padded like the batch)."""
        batch = texts if isinstance(texts, Batch) else self.encode(texts, add_special_tokens=add_special_tokens)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self._call(batch.input_ids, batch.attention_mask, positions, cache=False, last_only=False).logits

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        chat: bool | None = None,
        system: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
        use_cache: bool = True,
        ignore_eos: bool = False,
        progress: bool = False,
        schedule: StrengthSchedule | None = None,
    ) -> list[Generation]:
        """Generate a completion for each prompt (greedy when ``temperature`` is 0).

        The sampling keywords are those of :class:`~residlab.core.generation.SamplingParams`
        (checked there). Prompts are sorted by length into batches of ``batch_size`` to limit
        padding; results come back in the caller's order, and per-row steering vectors follow their
        rows. ``ignore_eos`` always generates ``max_new_tokens`` tokens (for speed measurements).
        ``schedule`` scales the active steering per row and token (:mod:`residlab.interventions.schedules`).
        """
        sampling = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos
        )

        def decode(batch: PromptBatch, sampling: SamplingParams, generator: torch.Generator | None) -> DecodedBatch:
            return self.decode_batch(batch, sampling, generator, use_cache=use_cache, schedule=schedule)

        return generate_batched(
            self.tokenizer,
            prompts,
            sampling,
            decode,
            chat=chat,
            system=system,
            batch_size=batch_size,
            progress=progress,
            model_name=self.name,
        )

    @torch.inference_mode()
    def decode_batch(
        self,
        prompts: PromptBatch,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        *,
        use_cache: bool = True,
        schedule: StrengthSchedule | None = None,
    ) -> DecodedBatch:
        """Generate for one batch of tokenised prompts (left-padded here): the torch engine's batch
        decoder. Rows that finish are dropped from the batch (and the KV cache), so a long straggler
        does not make every finished row keep paying for forward passes. ``schedule``: the active
        steering's scale at each generated position, per row (1 everywhere without one)."""
        batch = self.pad(prompts.token_ids)
        caller_rows = torch.tensor(prompts.rows, device=self.device)
        eos_ids = [] if sampling.ignore_eos else self.eos_token_ids or [-1]
        eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        ids, mask = batch.input_ids, batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prompt_lengths = batch.lengths
        active = torch.arange(ids.shape[0], device=self.device)  # batch rows still generating
        generated: list[list[int]] = [[] for _ in range(ids.shape[0])]
        finished_by_eos = [False] * ids.shape[0]
        cache: Any = None if use_cache else False
        step_ids, step_mask, step_pos = ids, mask, positions
        tracker = self.tracker
        scales = torch.ones((ids.shape[0], 0))  # [active rows, steps]: the schedule's scale per generated position
        try:
            for _ in range(sampling.max_new_tokens):
                tracker.row_index, tracker.prompt_lengths = caller_rows[active], prompt_lengths
                tracker.generated_scales = scales if schedule is not None else None
                out = self._call(step_ids, step_mask, step_pos, cache, last_only=True)
                # the logits come from the last block's device, which a device map may put elsewhere
                logits = out.logits[:, -1, :].float().to(self.device)
                next_token = pick_next_tokens(logits, sampling, generator)
                for row, token in zip(active.tolist(), next_token.tolist(), strict=True):
                    generated[row].append(token)
                if schedule is not None:
                    scales = torch.cat(
                        [scales, self._schedule_step(schedule, next_token, logits, scales, generated, active)], 1
                    )
                done = torch.isin(next_token, eos)
                if use_cache:
                    cache = _returned_cache(out)
                if bool(done.any()):
                    for row in active[done].tolist():
                        finished_by_eos[row] = True
                    keep = (~done).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    active, next_token, scales = active[keep], next_token[keep], scales[keep.cpu()]
                    ids, mask, positions, prompt_lengths = ids[keep], mask[keep], positions[keep], prompt_lengths[keep]
                    if use_cache:
                        cache.batch_select_indices(keep)
                ones = torch.ones((active.shape[0], 1), dtype=mask.dtype, device=mask.device)
                mask = torch.cat([mask, ones], dim=1)
                next_pos = positions[:, -1:] + 1
                positions = torch.cat([positions, next_pos], dim=1)
                ids = torch.cat([ids, next_token.unsqueeze(1)], dim=1)
                if use_cache:
                    step_ids, step_mask, step_pos = next_token.unsqueeze(1), mask, next_pos
                else:
                    step_ids, step_mask, step_pos = ids, mask, positions
        finally:
            tracker.row_index = tracker.prompt_lengths = tracker.generated_scales = None
        return DecodedBatch(generated, [not f for f in finished_by_eos])

    def _schedule_step(
        self,
        schedule: StrengthSchedule,
        tokens: torch.Tensor,
        logits: torch.Tensor,
        scales: torch.Tensor,
        generated: list[list[int]],
        active: torch.Tensor,
    ) -> torch.Tensor:
        """[active, 1]: the schedule's scale for the position of each row's new token."""
        previous = scales[:, -1] if scales.shape[1] else torch.ones(scales.shape[0])
        step = ScheduleStep(
            tokens.cpu(), logits, previous, [generated[r] for r in active.tolist()], self.tokenizer.decode
        )
        return schedule.scales(step).float().reshape(-1, 1)

    # -- interventions ------------------------------------------------------------------------
    def record(
        self, layers: Iterable[int | str], positions: PositionRule = "last", sites: Sequence[str] = ("block",)
    ) -> Recording:
        """Record activations at ``layers`` while the ``with`` block runs (see :class:`Recording`).

        ``layers`` are block numbers and ``"final_norm"`` (the last block's output after the final
        norm: Hugging Face's last ``hidden_states`` entry); ``sites`` the parts of each numbered block
        (``block``, ``block_input``, ``attn``, ``mlp``, ``mlp_act``, the norms' outputs).
        """
        return Recording(self, layers, positions, sites)

    def steer(
        self,
        vector: SteeringVector | Sequence[SteeringVector],
        strength: float | Sequence[float] | torch.Tensor = 1.0,
        positions: PositionRule | None = None,
        layers: Iterable[int] | None = None,
        *,
        allow_other_model: bool = False,
        site: str = "block",
        operator: str | SteeringOperator = "add",
    ) -> Steering:
        """Add ``strength * vector`` to the residual stream while the ``with`` block runs.

        ``vector`` is one :class:`SteeringVector` or one per prompt; ``strength`` a number or one per
        prompt. The strength multiplies the vector as stored (call ``vector.normalized()`` first to
        steer with unit directions). ``positions`` defaults to the rule the vector records
        (``vector.position_rule``: ``all`` for an imported llama.cpp / repeng file); the rule that
        runs is the returned :class:`Steering`'s ``rule``. ``layers`` restricts steering to some of
        the vector's layers. A vector recorded for a model of another name is refused unless
        ``allow_other_model`` (the shapes must match either way).

        ``site`` is where in each layer (default ``block``, the block's output; also ``block_input``,
        ``attn``, ``mlp`` and the norms' outputs) and ``operator`` how (``add``; ``project_out``,
        ``add_norm_preserving``, ``clamp`` or a callable: see :mod:`residlab.interventions.operators`).
        """
        from residlab.vectors.steering_vector import SteeringVector

        vectors = [vector] if isinstance(vector, SteeringVector) else list(vector)
        if not vectors:
            raise ResidlabError("no steering vector was given.", hint="pass a SteeringVector (or one per prompt).")
        for v in vectors:
            v.check_compatible(self, strict_name=not allow_other_model)
        chosen = sorted(vectors[0].layers) if layers is None else [self.check_layer(x) for x in layers]
        for v in vectors:
            missing = [x for x in chosen if x not in v.layers]
            if missing:
                raise ResidlabError(
                    f"the steering vector has no direction for layer(s) {missing}; it has {sorted(v.layers)}.",
                    hint="steer at the vector's layers or extract it at the layers you want.",
                )
        scale = torch.as_tensor(strength, dtype=torch.float32).flatten()
        deltas = {}
        for layer in chosen:
            stacked = torch.stack([v.directions[layer].float() for v in vectors])  # [1 or rows, d]
            if scale.numel() > 1 and stacked.shape[0] not in (1, scale.numel()):
                raise ResidlabError(
                    f"{stacked.shape[0]} vectors but {scale.numel()} strengths.",
                    hint="give one strength, or one per vector.",
                )
            deltas[layer] = stacked * scale.unsqueeze(1)
        rule = recorded_rule(v.position_rule for v in vectors) if positions is None else positions
        return Steering(self, deltas, rule, site=site, operator=operator)

    def edit(
        self,
        layers: int | Iterable[int],
        site: str,
        fn: EditFn | dict[int, EditFn],
        *,
        with_input: bool = False,
    ) -> Edit:
        """Replace ``site``'s value at ``layers`` with ``fn(value, ctx)`` while the ``with`` block runs.

        Sites: ``block``, ``attn``, ``mlp``, the norms (outputs) and ``block_input``, ``mlp_act``
        (inputs); see :class:`~residlab.interventions.edit.Edit`.
        """
        return Edit(self, layers, site, fn, with_input=with_input)

    def skip(self, layers: int | Iterable[int], from_position: int = 1) -> Edit:
        """Skip blocks (output := input) at real positions >= ``from_position`` while the ``with`` block runs."""
        return skip_blocks(self, layers, from_position)

    def __repr__(self) -> str:
        return (
            f"LanguageModel({self.name!r}, family={self.arch.family}, layers={self.num_layers}, "
            f"d_model={self.hidden_size}, dtype={self.dtype})"
        )


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
