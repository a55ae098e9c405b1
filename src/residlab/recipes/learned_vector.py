"""A steering vector trained, not extracted: contrastive energy-based steering.

One vector ``v`` at one layer, or one per layer of a small set trained jointly (``also_layers``),
each added at the prompt's last token and every completion token as generation steers, is trained
so that, under the steered model, the preferred completion of each pair becomes more likely than
the dispreferred one, while the model's next-token distributions on general text stay close to
the unsteered model's:

    loss = mean_pairs softplus(E(preferred) - E(dispreferred)) + weight * mean_tokens relu(KL_t - eps)

where ``E`` is the length-normalised negative log-likelihood of a completion given its prompt and
``KL_t = KL(base || steered)`` of the next-token distribution at each token of a general text.

Only ``v`` trains: every model parameter has ``requires_grad`` switched off for the run (and
restored after), no weight is copied, the model's own forward runs with residlab's steering hook,
whose delta is ``v``. On a CPU it stays affordable by keeping completions and general texts short
(``max_completion_tokens``, ``max_general_tokens``: a truncated trace, whose first tokens carry most
of the style) and one pair per step by default. Training checkpoints the vector, the optimiser and
the step every ``checkpoint_every`` steps, and resumes from the checkpoint; the data order depends
only on the step, so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from residlab.core.errors import ResidlabError
from residlab.core.io import atomic_path
from residlab.core.types import Log
from residlab.interventions.steer import Steering
from residlab.models.lm import LanguageModel


@dataclass(frozen=True)
class PreferencePair:
    """A rendered prompt and two completions of it: the one to make likelier and the other."""

    prompt: str
    preferred: str
    dispreferred: str


@dataclass(frozen=True)
class LearnSettings:
    """How the vector is trained (see the module docstring)."""

    layer: int
    also_layers: tuple[int, ...] = ()  # more layers steered and trained with ``layer``, jointly
    steps: int = 24
    learning_rate: float = 0.05  # Adam step, as a fraction of each layer's initial vector norm per sqrt(d)
    kl_eps: float = 0.05  # nats per token allowed before the hinge bites
    kl_weight: float = 10.0
    pairs_per_step: int = 1
    general_per_step: int = 1
    max_completion_tokens: int = 96
    max_general_tokens: int = 64
    checkpoint_every: int = 4

    def __post_init__(self) -> None:
        for name in ("steps", "pairs_per_step", "general_per_step", "max_completion_tokens", "max_general_tokens"):
            if int(getattr(self, name)) < 1:
                raise ResidlabError(f"{name} must be at least 1, got {getattr(self, name)}.", hint="use 1 or more.")
        if not (self.learning_rate > 0 and self.kl_eps >= 0 and self.kl_weight >= 0):
            raise ResidlabError(
                "the learning rate must be positive and the KL budget and weight non-negative.",
                hint="e.g. learning_rate=0.05, kl_eps=0.05, kl_weight=10.",
            )
        if len(set(self.layers)) != len(self.layers):
            raise ResidlabError(
                f"the layers {list(self.layers)} repeat one.", hint="name each layer once; also_layers excludes layer."
            )

    @property
    def layers(self) -> tuple[int, ...]:
        """Every trained layer: ``layer`` first, then ``also_layers``."""
        return (self.layer, *self.also_layers)


@dataclass(frozen=True)
class LearnedVector:
    """The trained vector (raw: its norm is the strength it was trained at) and how training went."""

    vector: torch.Tensor  # [d] float32, or [layers, d] in ``settings.layers`` order for several layers
    initial: torch.Tensor  # the same shape
    history: list[dict[str, float]] = field(default_factory=list)  # per step: loss, preference, kl, margin

    @property
    def norm(self) -> float:
        """The norm of the vector (of all layers' together for several)."""
        return float(self.vector.norm())

    @property
    def cosine_to_initial(self) -> float:
        """Cosine between the trained and the starting vector (all layers' flattened together)."""
        return float(F.cosine_similarity(self.vector.flatten(), self.initial.flatten(), dim=0))


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` off for the block, restored on exit (exceptions included)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _batch(lm: LanguageModel, heads: Sequence[str], tails: Sequence[str], limit: int):
    """Token ids of head + tail (the tail cut to ``limit`` tokens), left-padded, and each row's head length."""
    special = not lm.has_chat_template
    rows, heads_len = [], []
    for head, tail in zip(heads, tails, strict=True):
        head_ids = lm.tokenizer(head, add_special_tokens=special)["input_ids"]
        tail_ids = lm.tokenizer(tail, add_special_tokens=False)["input_ids"][:limit]
        if not tail_ids:
            raise ResidlabError("a completion tokenised to nothing.", hint="drop empty completions.")
        rows.append(list(head_ids) + list(tail_ids))
        heads_len.append(len(head_ids))
    return lm.pad(rows), torch.tensor(heads_len, device=lm.device)


Deltas = Mapping[int, torch.Tensor]  # layer -> the delta added to that layer's output


def _logits(lm: LanguageModel, batch, heads_len: torch.Tensor, steer: Deltas | None, rule: str, keep: int = 0):
    """Teacher-forced logits [b, t, vocab] (float32; only the last ``keep`` positions' when ``keep`` > 0);
    ``steer`` = {layer: delta} added where ``rule`` says, each row's head counting as its prompt."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    steering = Steering(lm, dict(steer), rule) if steer is not None else contextlib.nullcontext()
    extra = {"logits_to_keep": keep} if keep else {}
    lm.tracker.prompt_lengths = heads_len
    try:
        with steering:
            out = lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=positions,
                use_cache=False,
                **extra,
            )
    finally:
        lm.tracker.prompt_lengths = None
    return out.logits.float()


def _tail_mask(batch, heads_len: torch.Tensor) -> torch.Tensor:
    """[b, t-1] 1 where position t+1 is a completion token (the logits at t predict it)."""
    real = batch.attention_mask.bool()
    index = real.long().cumsum(-1) - 1  # real position of each token
    is_tail = real & (index >= heads_len.unsqueeze(1))
    return is_tail[:, 1:].float()


def energies(lm: LanguageModel, batch, heads_len: torch.Tensor, steer: Deltas | None) -> torch.Tensor:
    """[b] length-normalised NLL of each row's completion given its head, steered by ``steer``
    ({layer: delta}) from the head's last token on."""
    mask = _tail_mask(batch, heads_len)
    # Rows are left-padded, so every logit that predicts a completion token is in the last columns: the
    # unembedding (136M weights on the default model, the costliest matrix) runs on those alone.
    first = int(mask.any(0).float().argmax()) if lm.accepts_logits_to_keep else 0
    keep = mask.shape[1] - first + 1 if first else 0
    logits = _logits(lm, batch, heads_len, steer, "prompt_last+generated", keep)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, batch.input_ids[:, first + 1 :].unsqueeze(-1)).squeeze(-1)
    mask = mask[:, first:]
    return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def general_kl(lm: LanguageModel, batch, steer: Deltas) -> torch.Tensor:
    """[b, t] KL(base || steered) of the next-token distribution at every real token of general texts
    (steered at every position), 0 at padding."""
    ones = torch.zeros(batch.input_ids.shape[0], dtype=torch.long, device=lm.device)
    with torch.no_grad():
        base = torch.log_softmax(_logits(lm, batch, ones, None, "all"), dim=-1)
    steered = torch.log_softmax(_logits(lm, batch, ones, steer, "all"), dim=-1)
    kl = (base.exp() * (base - steered)).sum(-1)
    return kl * batch.attention_mask.float()


# A checkpoint resumes when its starting vector matches this run's to within this cosine. The starting
# vector is an extraction whose last bits depend on the thread count (bf16 matmul blocking), so an exact
# match would re-learn from scratch after a change of machine or OMP_NUM_THREADS.
RESUME_MIN_COSINE = 0.9999
RESUME_MAX_NORM_CHANGE = 1e-3


def _fingerprint(lm: LanguageModel, settings: LearnSettings, pairs, general) -> str:
    # The step count is not part of the key: a longer run continues a shorter one's checkpoint. The
    # starting vector is not either: it is compared with a tolerance on resume (same_start). No extra
    # layers is left out, so one-layer checkpoints keep the key they had before also_layers existed.
    defining = {k: v for k, v in asdict(settings).items() if k not in ("steps", "checkpoint_every")}
    if not settings.also_layers:
        del defining["also_layers"]
    digest = hashlib.sha256(json.dumps([lm.name, str(lm.dtype), defining], sort_keys=True).encode())
    for item in [*pairs, *general]:
        digest.update(json.dumps(asdict(item) if isinstance(item, PreferencePair) else item).encode())
    return digest.hexdigest()[:12]


def same_start(saved: torch.Tensor, initial: torch.Tensor) -> bool:
    """Whether a checkpoint's starting vector is this run's, up to the last bits of the extraction."""
    saved, initial = saved.float().flatten(), initial.float().flatten()
    if saved.shape != initial.shape:
        return False
    norms = float(saved.norm()), float(initial.norm())
    if min(norms) == 0.0:
        return norms[0] == norms[1]
    cosine = float(torch.dot(saved, initial)) / (norms[0] * norms[1])
    return cosine >= RESUME_MIN_COSINE and abs(norms[0] - norms[1]) <= RESUME_MAX_NORM_CHANGE * norms[1]


def learn_vector(
    lm: LanguageModel,
    pairs: Sequence[PreferencePair],
    general: Sequence[str],
    initial: torch.Tensor,
    settings: LearnSettings,
    *,
    checkpoint_dir: str | Path | None = None,
    log: Log | None = None,
) -> LearnedVector:
    """Train ``initial`` (raw: [d] at ``settings.layer``, or [layers, d] at ``settings.layers`` in that
    order) by the contrastive energy loss with the KL hinge; the result has ``initial``'s shape.

    ``general`` texts (rendered as they are) bound the KL. With ``checkpoint_dir``, the run resumes from
    its checkpoint (keyed by the model, settings and texts; the starting vector must match to within
    ``RESUME_MIN_COSINE``, else it learns again) and checkpoints as it goes. Runs that differ only in
    their starting vector share that one checkpoint: the later one replaces the earlier one's.
    """
    if not pairs or not general:
        raise ResidlabError(
            "learning a vector needs preference pairs and general texts.", hint="give at least one of each."
        )
    layers = tuple(lm.check_layer(k) for k in settings.layers)
    initial = initial.detach().float().cpu()
    if initial.reshape(-1, initial.shape[-1]).shape[0] != len(layers) or initial.dim() > 2:
        raise ResidlabError(
            f"the starting vector has shape {list(initial.shape)} for {len(layers)} layer(s) {list(layers)}.",
            hint="give [d] for one layer or [layers, d], one row per layer in settings.layers order.",
        )
    # One parameter per layer, each with its own step size: Adam moves every element by about the
    # learning rate, so a layer of a small residual norm would otherwise move further, relative to its size.
    rows = [torch.nn.Parameter(row.clone()) for row in initial.reshape(len(layers), -1)]
    optimizer = torch.optim.Adam(
        [{"params": [row], "lr": settings.learning_rate * (float(row.detach().norm()) / math.sqrt(row.numel()) or 1.0)}
         for row in rows]
    )  # fmt: skip

    def vector() -> torch.Tensor:
        """The trained rows in ``initial``'s shape."""
        return torch.stack([row.detach() for row in rows]).reshape(initial.shape).clone()

    history: list[dict[str, float]] = []
    start = 0
    path = None
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / f"learned-{_fingerprint(lm, settings, pairs, general)}.pt"
        state = torch.load(path, weights_only=False) if path.exists() else None
        if state is not None and not same_start(state.get("initial", torch.zeros(0)), initial):
            if log is not None:
                why = "started from another vector" if "initial" in state else "records no starting vector"
                log(f"      {path.name} {why}; learning again from this one (and replacing it)")
            state = None
        if state is not None:
            with torch.no_grad():
                for row, saved_row in zip(rows, state["vector"].reshape(len(layers), -1), strict=True):
                    row.copy_(saved_row)
            optimizer.load_state_dict(state["optimizer"])
            start, history = int(state["step"]), list(state["history"])
            history = history[: settings.steps]
    with frozen(lm.model), torch.enable_grad():
        for step in range(start, settings.steps):
            record = _train_step(lm, layers, pairs, general, rows, optimizer, settings, step)
            history.append(record)
            if log is not None:
                log(
                    f"      step {step + 1}/{settings.steps}: loss {record['loss']:.4f} (preference "
                    f"{record['preference']:.4f}, KL {record['kl']:.4f}, margin {record['margin']:+.4f})"
                )
            done = step + 1
            if path is not None and (done % settings.checkpoint_every == 0 or done == settings.steps):
                saved = {"vector": vector(), "optimizer": optimizer.state_dict(), "step": done}
                with atomic_path(path) as tmp:
                    torch.save({**saved, "initial": initial, "history": history}, tmp)
    return LearnedVector(vector(), initial, history)


def _train_step(
    lm: LanguageModel,
    layers: tuple[int, ...],
    pairs: Sequence[PreferencePair],
    general: Sequence[str],
    rows: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    settings: LearnSettings,
    step: int,
) -> dict[str, float]:
    """One optimiser step on the pairs and general texts this step's index selects (``rows``: one
    trained vector per layer of ``layers``)."""
    chosen = [pairs[(step * settings.pairs_per_step + j) % len(pairs)] for j in range(settings.pairs_per_step)]
    texts = [general[(step * settings.general_per_step + j) % len(general)] for j in range(settings.general_per_step)]
    optimizer.zero_grad()
    steer = {k: row.to(lm.device) for k, row in zip(layers, rows, strict=True)}
    heads = [p.prompt for p in chosen] * 2
    tails = [p.preferred for p in chosen] + [p.dispreferred for p in chosen]
    batch, heads_len = _batch(lm, heads, tails, settings.max_completion_tokens)
    energy = energies(lm, batch, heads_len, steer)
    n = len(chosen)
    margin = energy[:n] - energy[n:]  # preferred - dispreferred: lower is better
    preference = F.softplus(margin).mean()
    general_batch, _ = _batch(lm, [""] * len(texts), texts, settings.max_general_tokens)
    kl = general_kl(lm, general_batch, steer)
    real = general_batch.attention_mask.float().sum().clamp_min(1)
    hinge = (F.relu(kl - settings.kl_eps) * general_batch.attention_mask.float()).sum() / real
    loss = preference + settings.kl_weight * hinge
    loss.backward()
    optimizer.step()
    return {
        "step": float(step + 1),
        "loss": float(loss.detach()),
        "preference": float(preference.detach()),
        "kl": float(kl.detach().sum() / real),
        "margin": float(margin.detach().mean()),
        "norm": float(torch.stack([row.detach() for row in rows]).norm()),
    }
