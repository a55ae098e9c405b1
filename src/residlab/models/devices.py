"""Where a model runs: ``--device``, ``--device-map`` and ``--dtype`` resolved to torch objects.

Resolution is a pure function of the option text and a :class:`Hardware` description, so tests
check every branch (several GPUs, no GPU, Apple silicon) on a CPU-only machine; :meth:`Hardware.detect`
asks torch about the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from residlab.core.errors import ResidlabError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Hardware:
    """What this process can run on: the CUDA device count (and whether they run bfloat16), Apple's
    MPS, and whether the CPU has native bfloat16 kernels (AVX512-BF16 / AMX)."""

    cuda_devices: int = 0
    cuda_bf16: bool = False
    mps: bool = False
    cpu_bf16: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        """The machine this process runs on (asks torch; no device is initialised beyond CUDA's count)."""
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps_backend = getattr(torch.backends, "mps", None)
        try:
            cpu_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            cpu_bf16 = False
        return cls(
            cuda_devices=cuda,
            cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
            mps=bool(mps_backend is not None and mps_backend.is_available()),
            cpu_bf16=cpu_bf16,
        )


def resolve_device(spec: str | torch.device = "auto", hardware: Hardware | None = None) -> torch.device:
    """``auto`` -> ``cuda:0`` when CUDA is present, else ``mps`` when present, else ``cpu``;
    ``cpu``, ``cuda`` (= ``cuda:0``), ``cuda:N`` and ``mps`` are checked against the hardware."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    hw = hardware if hardware is not None else Hardware.detect()
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if hw.cuda_devices else torch.device("mps") if hw.mps else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not hw.mps:
            raise ResidlabError("--device mps, but this machine has no MPS (Apple silicon) backend.",
                                hint="use --device auto or cpu.")  # fmt: skip
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ResidlabError(f"cannot read device {spec!r}.", hint=f"use {DEVICE_CHOICES}.")
        index = int(index_text)
        if hw.cuda_devices == 0:
            raise ResidlabError(
                f"--device {spec}, but torch sees no CUDA GPU here.",
                hint="use --device auto or cpu; on a GPU machine install a CUDA build of torch.",
            )
        if index >= hw.cuda_devices:
            raise ResidlabError(f"--device {spec}, but this machine has {hw.cuda_devices} CUDA GPU(s).",
                                hint=f"use cuda:0 .. cuda:{hw.cuda_devices - 1}.")  # fmt: skip
        return torch.device("cuda", index)
    raise ResidlabError(f"unknown device {spec!r}.", hint=f"use {DEVICE_CHOICES}.")


def resolve_dtype(
    spec: str | torch.dtype | None, device: torch.device | str = "cpu", hardware: Hardware | None = None
) -> torch.dtype:
    """``None`` -> float32 (exact: the default of analyses); ``auto`` -> bfloat16 on a GPU that has it
    (float16 on an older GPU or MPS), on a CPU bfloat16 only where it has native kernels (which
    measured twice float32's generation speed, benchmarks/results/engines.md), else float32; or a name."""
    if spec is None:
        return torch.float32
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        hw = hardware if hardware is not None else Hardware.detect()
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.bfloat16 if hw.cuda_bf16 else torch.float16
        if kind == "mps":
            return torch.float16
        return torch.bfloat16 if hw.cpu_bf16 else torch.float32
    if spec not in _DTYPES:
        raise ResidlabError(f"unknown dtype {spec!r}.", hint=f"use auto or one of {', '.join(_DTYPES)}.")
    return _DTYPES[spec]


def check_device_map(spec: str | None) -> str | None:
    """A device map name accelerate understands (``auto`` spreads the blocks over every GPU, then the
    CPU), or ``None`` (the whole model on one ``--device``)."""
    if spec is None or spec in DEVICE_MAPS:
        return spec
    raise ResidlabError(f"unknown device map {spec!r}.", hint=f"use one of {', '.join(DEVICE_MAPS)}, or leave it out.")


@dataclass(frozen=True)
class Placement:
    """Where and how a model's weights are loaded: one ``device``, or accelerate's ``device_map``
    (then ``device`` is where inputs start), and the ``dtype``."""

    device: torch.device
    dtype: torch.dtype
    device_map: str | dict[str, Any] | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoModelForCausalLM.from_pretrained``."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs


def placement(
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    hardware: Hardware | None = None,
) -> Placement:
    """Resolve the three options together (``auto`` dtype depends on the device chosen)."""
    hw = hardware if hardware is not None else Hardware.detect()
    resolved = resolve_device(device, hw)
    if isinstance(device_map, str):
        check_device_map(device_map)
    return Placement(resolved, resolve_dtype(dtype, resolved, hw), device_map)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its input embedding's (execution) device. Under an accelerate device
    map some weights may live on ``meta`` (offloaded) or another GPU; accelerate's hook on the
    embedding knows where it runs."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embed = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embed, torch.nn.Module):
        hook = getattr(embed, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
        for param in embed.parameters():
            return param.device
    return next(model.parameters()).device


def block_devices(blocks: list[torch.nn.Module]) -> list[torch.device]:
    """The device each decoder block computes on (its parameters', or accelerate's execution device)."""
    devices = []
    for block in blocks:
        execution = getattr(getattr(block, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            devices.append(torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}"))
        else:
            devices.append(next(block.parameters()).device)
    return devices


def describe_blocks(devices: list[torch.device]) -> str:
    """``cuda:0`` for a model on one device, else each device with its block range
    (``cuda:0 (blocks 0-13), cuda:1 (blocks 14-27)``)."""
    runs: list[tuple[str, int, int]] = []
    for index, device in enumerate(devices):
        if runs and runs[-1][0] == str(device):
            runs[-1] = (runs[-1][0], runs[-1][1], index)
        else:
            runs.append((str(device), index, index))
    if len(runs) <= 1:
        return runs[0][0] if runs else "-"
    return ", ".join(f"{name} (blocks {first}-{last})" for name, first, last in runs)
