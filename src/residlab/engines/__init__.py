"""Inference engines behind one interface (``base``: the ``Engine`` base class, which does the shared
front half of ``generate`` and is a context manager, and ``SteeringSpec``): ``torch`` (transformers +
residlab's hooks) and ``llamacpp`` (llama.cpp's control-vector adapter); a new engine (vLLM) is one
module that fills in a batch decoder and ``score``. ``spec.EngineSpec`` says how to open one (model,
engine, dtype, device, device map, GPU layers) as a picklable value: what a Ray actor receives."""

from __future__ import annotations

from typing import TYPE_CHECKING

from residlab.core.errors import ResidlabError
from residlab.core.generation import SamplingParams
from residlab.engines.base import ENGINES, Engine, SteeringSpec
from residlab.engines.spec import EngineSpec

if TYPE_CHECKING:
    from residlab.models.lm import LanguageModel

__all__ = [
    "ENGINES",
    "Engine",
    "EngineSpec",
    "SamplingParams",
    "SteeringSpec",
    "as_engine",
    "llama_cpp_available",
    "open_engine",
    "resolve_engine",
]


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (``make install-llamacpp`` / the ``llamacpp`` extra)."""
    import importlib.util
    import sys

    if "llama_cpp" in sys.modules:  # imported already (or blocked, as tests do with None)
        return sys.modules["llama_cpp"] is not None
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_engine(model: str, engine: str = "auto") -> str:
    """``auto`` -> ``llamacpp`` when it is installed and ``model`` is a GGUF (packaged or a .gguf
    path), else ``torch``; an explicit engine name is checked and returned."""
    from residlab.models.registry import packaged_model

    if engine == "auto":
        gguf_backed = packaged_model(model) is not None or model.endswith(".gguf")
        return "llamacpp" if gguf_backed and llama_cpp_available() else "torch"
    if engine not in ENGINES:
        raise ResidlabError(f"unknown engine {engine!r}.", hint=f"use auto or one of {', '.join(ENGINES)}.")
    return engine


def open_engine(
    model: str,
    engine: str = "torch",
    *,
    dtype: str | None = None,
    lm: LanguageModel | None = None,
    threads: int | None = None,
    device: str = "cpu",
    device_map: str | None = None,
    n_gpu_layers: int | None = None,
) -> Engine:
    """An engine for ``model`` (packaged name, .gguf path, model dir or hub id; llama.cpp needs a GGUF).
    ``engine``: ``torch``, ``llamacpp`` or ``auto`` (see :func:`resolve_engine`).

    ``lm``: an already loaded model to reuse for the torch engine. ``dtype`` applies to torch only
    (llama.cpp runs the GGUF's own quantised weights), as do ``device`` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``, ``mps``) and ``device_map`` (accelerate's ``auto``: a model larger than one GPU spread
    over all of them); ``threads`` and ``n_gpu_layers`` (``None``: all where the build has GPU
    support; see :func:`~residlab.engines.llamacpp.gpu_layers`) to llama.cpp only. The engine is a
    context manager: ``with open_engine(...) as engine:`` closes it (frees llama.cpp's memory) on exit.
    """
    engine = resolve_engine(model, engine)
    if engine == "torch":
        from residlab.engines.torch_engine import TorchEngine
        from residlab.models.loading import load

        return TorchEngine(lm if lm is not None else load(model, dtype=dtype, device=device, device_map=device_map))
    if engine == "llamacpp":
        from residlab.engines.llamacpp import LlamaCppEngine, import_llama_cpp
        from residlab.models.loading import load_gguf

        import_llama_cpp()  # fail early, before any download, if the bindings are missing
        resolved = load_gguf(model)
        return LlamaCppEngine(
            resolved.gguf,
            resolved.tokenizer,
            name=resolved.name,
            eos_ids=resolved.eos_ids,
            threads=threads,
            n_gpu_layers=n_gpu_layers,
        )
    raise AssertionError(engine)  # resolve_engine only returns known engines


def as_engine(model: LanguageModel | Engine) -> Engine:
    """Accept a :class:`LanguageModel` wherever an engine is expected (wrapped in the torch engine)."""
    from residlab.models.lm import LanguageModel

    if isinstance(model, LanguageModel):
        from residlab.engines.torch_engine import TorchEngine

        return TorchEngine(model)
    return model
