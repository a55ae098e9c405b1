"""Training an SAE on a harvested store: Adam, LR warm-up and linear decay, unit-norm decoder, resumable.

Each step: loss -> backward -> drop the decoder gradient's component along each row -> Adam step ->
renormalise the decoder rows -> update the dead-latent counters. A checkpoint (weights, optimiser,
step, history) is written atomically every ``checkpoint_every`` steps and at the end; a run started
again with the same folder continues from it and, since batch ``i`` of the store's stream does not
depend on where the stream started, produces the same SAE as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from residlab.core.errors import ResidlabError
from residlab.core.io import atomic_path, write_json
from residlab.saes.activations import ActivationStore
from residlab.saes.base import SAEConfig, SparseAutoencoder, build_sae

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``lr=None`` uses Gao et al.'s scaling 2e-4 / sqrt(d_sae / 2^14)."""

    total_tokens: int
    batch_size: int = 4096
    lr: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # the LR falls linearly to 0 over this last fraction of the steps
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    b_dec_init: str = "geometric_median"  # or "mean"
    b_dec_init_tokens: int = 32_768

    @property
    def steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def learning_rate(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)

    def lr_factor(self, step: int) -> float:
        """The LR multiplier at ``step`` (0-based): linear warm-up, flat, linear decay to 0."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        decay_start = int(self.steps * (1 - self.decay_fraction))
        if step < decay_start or self.decay_fraction <= 0:
            return warm
        return warm * max(0.0, (self.steps - step) / max(1, self.steps - decay_start))


@dataclass
class TrainState:
    """What a checkpoint holds besides the tensors."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class TrainedSAE:
    """A finished training run."""

    sae: SparseAutoencoder
    history: list[dict[str, float]]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _save_checkpoint(path: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, state: TrainState, meta: dict):
    with atomic_path(path) as tmp:
        torch.save(
            {
                "sae": sae.state_dict(),
                "optimizer": opt.state_dict(),
                "state": asdict(state),
                "meta": meta,
                "rng": torch.get_rng_state(),  # the vSAE's posterior noise continues where it stopped
            },
            tmp,
        )


def _load_checkpoint(path: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, meta: dict) -> TrainState:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["meta"] != meta:
        raise ResidlabError(
            f"{path} is a checkpoint of another run.",
            hint="use the same SAE and training settings to resume, or another output folder (or --force).",
        )
    sae.load_state_dict(saved["sae"])
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    return TrainState(**saved["state"])


def train_sae(
    cfg: SAEConfig,
    store: ActivationStore,
    train: TrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainedSAE:
    """Train (or resume training) an SAE of ``cfg`` on ``store``; checkpoints go to ``out_dir``.

    ``stop_after`` ends the run early after that many steps of this call (as a kill would; tests use it).
    """
    from tqdm.auto import tqdm

    if store.d != cfg.d_in:
        raise ResidlabError(
            f"the store holds width {store.d}, the SAE expects {cfg.d_in}.",
            hint="train on activations harvested from the model and site the SAE is for.",
        )
    torch.manual_seed(train.seed)
    sae = build_sae(cfg)
    lr = train.learning_rate(cfg.d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=train.adam_betas, eps=train.adam_eps)
    out = Path(out_dir)
    path = out / CHECKPOINT
    meta = {"sae": cfg.to_dict(), "train": asdict(train), "store": store.spec.fingerprint}
    if path.is_file():
        state = _load_checkpoint(path, sae, opt, meta)
    else:
        state = TrainState()
        sae.init_b_dec(store.activations(train.b_dec_init_tokens), method=train.b_dec_init)
    stream = store.batches(train.batch_size, seed=train.seed, start_step=state.step)
    bar = tqdm(total=train.steps, initial=state.step, unit="step", disable=not progress, desc=f"train {cfg.arch}")
    done_here = 0
    while state.step < train.steps and (stop_after is None or done_here < stop_after):
        started = time.perf_counter()
        x = next(stream)
        for group in opt.param_groups:
            group["lr"] = lr * train.lr_factor(state.step)
        terms, out_batch = sae.loss(x, step_fraction=state.step / train.steps)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        sae.remove_parallel_gradient()
        if train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), train.grad_clip)
        opt.step()
        sae.normalize_decoder()
        sae.record_firing(out_batch.z.detach())
        state.step += 1
        done_here += 1
        state.seconds += time.perf_counter() - started
        if state.step % max(1, train.steps // 200) == 0 or state.step == train.steps:
            state.history.append({"step": state.step, **terms.parts, "dead": float(sae.dead_mask.float().mean())})
            bar.set_postfix(nmse=f"{terms.parts['nmse']:.3f}")
        bar.update(1)
        if state.step % train.checkpoint_every == 0 or state.step == train.steps:
            _save_checkpoint(path, sae, opt, state, meta)
    bar.close()
    if done_here and state.step % train.checkpoint_every != 0 and state.step != train.steps:
        _save_checkpoint(path, sae, opt, state, meta)
    write_json(out / "train_history.json", {"config": meta, "history": state.history, "seconds": state.seconds})
    return TrainedSAE(sae, state.history, state.step * train.batch_size, state.seconds)
