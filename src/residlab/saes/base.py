"""The sparse-autoencoder interface, its frozen config and the architecture registry.

An SAE reads activations ``x`` [tokens, d_in] of one site of one layer and writes codes ``z``
[tokens, d_sae]; ``x_hat = z @ W_dec + b_dec``. Weights follow SAELens' layout: ``W_enc``
[d_in, d_sae], ``W_dec`` [d_sae, d_in] (row i is latent i's decoder direction, kept unit-norm),
``b_enc`` [d_sae], ``b_dec`` [d_in] (also subtracted from the input: the pre-encoder bias).

A new architecture is one file: a config subclass and an SAE subclass decorated with
:func:`register` (see :mod:`residlab.saes.topk`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from residlab.core.errors import ResidlabError


@dataclass(frozen=True)
class HookPoint:
    """Where an SAE reads: ``site`` (see interventions.record.SITES) of ``layer`` in ``model``."""

    model: str
    layer: int
    site: str = "block"


@dataclass(frozen=True)
class SAEConfig:
    """What every architecture shares. ``arch`` names the registered class."""

    arch: ClassVar[str] = ""
    d_in: int
    d_sae: int
    k: int
    hook: HookPoint = HookPoint("", 0)
    dead_window: int = 10_000_000  # a latent is dead when it has not fired in this many training tokens
    aux_k: int | None = None  # latents in the AuxK reconstruction (None: d_in // 2)
    aux_coeff: float = 1 / 32
    context_len: int = 128
    corpus: str = ""

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise ResidlabError(
                f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}.", hint="pass a positive --width."
            )
        if not 1 <= self.k <= self.d_sae:
            raise ResidlabError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}.", hint="pick a smaller k.")
        if self.dead_window < 1:
            raise ResidlabError(
                f"dead_window must be at least 1 token, got {self.dead_window}.", hint="pass e.g. 1000000 tokens."
            )

    @property
    def k_aux(self) -> int:
        return min(self.d_sae, self.aux_k if self.aux_k is not None else max(1, self.d_in // 2))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``arch``."""
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> SAEConfig:
        """The config of the architecture ``payload["arch"]`` (unknown keys are refused)."""
        arch = payload.get("arch", "")
        config_cls = architecture(arch).config_cls
        names = {f.name for f in fields(config_cls)}
        unknown = sorted(set(payload) - names - {"arch"})
        if unknown:
            raise ResidlabError(f"unknown {arch} SAE config keys {unknown}.", hint="was it written by residlab?")
        values = {k: v for k, v in payload.items() if k in names}
        if isinstance(values.get("hook"), dict):
            values["hook"] = HookPoint(**values["hook"])
        return config_cls(**values)


@dataclass(frozen=True)
class SAEOutput:
    """One forward pass: reconstruction, codes, and the encoder's pre-activations (for AuxK)."""

    x_hat: torch.Tensor
    z: torch.Tensor
    pre: torch.Tensor
    extra: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossTerms:
    """The training loss and its parts (plain floats for logging besides the tensor)."""

    total: torch.Tensor
    parts: dict[str, float]


def item(value: torch.Tensor) -> float:
    """A scalar tensor as a float for logs (detached first)."""
    return float(value.detach())


def nmse_centred(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error over the batch's mean-centred variance (Gao et al.'s normalised MSE)."""
    variance = (x - x.mean(dim=0, keepdim=True)).pow(2).sum(-1).mean()
    return (x_hat - x).pow(2).sum(-1).mean() / variance.clamp_min(1e-12)


class SparseAutoencoder(nn.Module, ABC):
    """Base of the architectures. Subclasses define the codes (``forward``) and ``loss``."""

    config_cls: ClassVar[type[SAEConfig]] = SAEConfig
    tokens_since_fired: torch.Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        w = torch.empty(d_sae, d_in)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.t().clone())  # the decoder's transpose at the start
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # training tokens since each latent last fired (dead-latent bookkeeping; saved with the weights)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    # -- the model ------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc^T (x - b_dec) + b_enc``, [tokens, d_sae]."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    @abstractmethod
    def forward(self, x: torch.Tensor, *, sample: bool | None = None) -> SAEOutput:
        """Codes and reconstruction of ``x`` [tokens, d_in]."""

    @abstractmethod
    def loss(self, x: torch.Tensor, *, step_fraction: float = 1.0) -> tuple[LossTerms, SAEOutput]:
        """The training loss on a batch; ``step_fraction`` (0..1) is how far training has come."""

    def encode(self, x: torch.Tensor, *, sample: bool | None = None) -> torch.Tensor:
        """Sparse codes [tokens, d_sae]."""
        return self.forward(x, sample=sample).z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction from codes."""
        return z @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor, *, sample: bool | None = None) -> torch.Tensor:
        """``x_hat`` for activations of any leading shape [..., d_in] (computed in float32)."""
        flat = x.reshape(-1, x.shape[-1]).to(self.W_dec.dtype)
        return self.forward(flat, sample=sample).x_hat.reshape(x.shape).to(x.dtype)

    # -- training invariants ----------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient along the row (it would only change its norm)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(dim=1, keepdim=True) * w)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, *, method: str = "geometric_median") -> None:
        """Set the pre-encoder bias to the geometric median (or ``mean``) of an activation sample."""
        sample = sample.to(self.b_dec.dtype)
        centre = geometric_median(sample) if method == "geometric_median" else sample.mean(dim=0)
        self.b_dec.copy_(centre)

    @torch.no_grad()
    def record_firing(self, z: torch.Tensor) -> None:
        """Update the dead-latent counters after a training batch of codes ``z``."""
        fired = (z != 0).any(dim=0)
        self.tokens_since_fired.add_(z.shape[0])
        self.tokens_since_fired[fired] = 0

    @property
    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired within the last ``cfg.dead_window`` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_window

    def aux_k_loss(self, x: torch.Tensor, out: SAEOutput) -> torch.Tensor:
        """AuxK: the top ``k_aux`` *dead* latents reconstruct the residual ``x - x_hat`` (x_hat detached).

        The residual carries no bias, so ``b_dec`` is not counted twice; normalised like the main loss.
        """
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        residual = x - out.x_hat.detach()
        pre = out.pre.masked_fill(~dead, float("-inf"))
        values, index = pre.topk(min(self.cfg.k_aux, n_dead), dim=-1)
        codes = torch.zeros_like(out.pre).scatter(-1, index, values.relu())
        return nmse_centred(codes @ self.W_dec, residual).nan_to_num(0.0)


def geometric_median(points: torch.Tensor, *, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to ``points`` [n, d] (Weiszfeld's algorithm)."""
    guess = points.mean(dim=0)
    for _ in range(iterations):
        distances = (points - guess).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        new = (weights.unsqueeze(1) * points).sum(dim=0) / weights.sum()
        if float((new - guess).norm()) <= tol * max(1.0, float(guess.norm())):
            return new
        guess = new
    return guess


# --------------------------------------------------------------------------- registry

SAEClass = TypeVar("SAEClass", bound=type[SparseAutoencoder])
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}


def register(name: str) -> Callable[[SAEClass], SAEClass]:
    """Register an SAE class under ``name`` (its config class must carry ``arch = name``)."""

    def add(cls: SAEClass) -> SAEClass:
        if cls.config_cls.arch != name:
            raise TypeError(f"{cls.__name__}.config_cls.arch is {cls.config_cls.arch!r}, expected {name!r}")
        ARCHITECTURES[name] = cls
        return cls

    return add


def architecture(name: str) -> type[SparseAutoencoder]:
    """The registered SAE class called ``name``."""
    _load_builtin_architectures()
    if name not in ARCHITECTURES:
        raise ResidlabError(f"unknown SAE architecture {name!r}.", hint=f"use one of {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of ``cfg``'s architecture."""
    return architecture(cfg.arch)(cfg)


def _load_builtin_architectures() -> None:
    # The built-in architectures register themselves on import.
    import residlab.saes.batchtopk  # noqa: F401
    import residlab.saes.topk  # noqa: F401
    import residlab.saes.vsae  # noqa: F401
