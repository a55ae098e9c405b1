"""GPU options of the llama.cpp engine (--n-gpu-layers) and the install script's build flavour, as
functions of the environment (no GPU needed: fake nvcc / nvidia-smi executables stand in for a CUDA
toolkit and driver; the script only asks them whether they run)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from residlab.core.errors import ResidlabError
from residlab.engines import EngineSpec, llama_cpp_available
from residlab.engines.llamacpp import ALL_LAYERS, gpu_layers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-llamacpp.sh"


@pytest.mark.parametrize(
    ("requested", "gpu", "expected"),
    [(None, True, ALL_LAYERS), (None, False, 0), (-1, True, ALL_LAYERS), (0, False, 0), (0, True, 0), (12, True, 12)],
)
def test_gpu_layers(requested, gpu, expected):
    assert gpu_layers(requested, gpu) == expected


@pytest.mark.parametrize("requested", [-1, 8])
def test_gpu_layers_on_a_cpu_build_is_a_clear_error(requested):
    with pytest.raises(ResidlabError, match="without GPU support") as err:
        gpu_layers(requested, False)
    assert "GGML_CUDA" in err.value.hint
    with pytest.raises(ResidlabError, match="not a layer count"):
        gpu_layers(-2, True)


def test_engine_spec_says_when_it_wants_a_gpu():
    assert not EngineSpec("m").uses_gpu
    assert EngineSpec("m", device="cuda:1").uses_gpu
    assert EngineSpec("m", device_map="auto").uses_gpu
    assert EngineSpec("m", engine="llamacpp", n_gpu_layers=-1).uses_gpu


def _flavour(tmp_path: Path, *, tools: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    """The flavour the install script picks with ``tools`` (fake executables) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        fake = bin_dir / tool
        fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.6'\n")
        fake.chmod(0o755)
    environment = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHON": "python3",
        "RESIDLAB_LLAMACPP_PRINT_FLAVOUR": "1",
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)


def test_install_script_builds_for_cuda_with_a_toolkit_and_a_driver(tmp_path):
    cpu = _flavour(tmp_path, RESIDLAB_LLAMACPP_GPU="cpu")
    assert cpu.returncode == 0 and cpu.stdout.strip() in ("native", "noamx"), cpu.stderr
    cuda = _flavour(tmp_path, tools=("nvcc", "nvidia-smi"))
    assert cuda.returncode == 0 and cuda.stdout.strip() == f"cuda-{cpu.stdout.strip()}", cuda.stderr
    forced = _flavour(tmp_path, RESIDLAB_LLAMACPP_GPU="cuda")
    assert forced.stdout.strip() == f"cuda-{cpu.stdout.strip()}"
    bad = _flavour(tmp_path, RESIDLAB_LLAMACPP_GPU="rocm")
    assert bad.returncode == 2 and "cuda or cpu" in bad.stderr


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this machine has an NVIDIA driver")
def test_install_script_builds_for_the_cpu_with_a_toolkit_but_no_driver(tmp_path):
    cpu = _flavour(tmp_path, RESIDLAB_LLAMACPP_GPU="cpu").stdout.strip()
    toolkit_only = _flavour(tmp_path, tools=("nvcc",))
    if "libcuda.so.1" in subprocess.run(["bash", "-c", "ldconfig -p 2>/dev/null || /sbin/ldconfig -p"],
                                        capture_output=True, text=True).stdout:  # fmt: skip
        pytest.skip("this machine has the CUDA driver library")
    assert toolkit_only.stdout.strip() == cpu
    assert "no NVIDIA driver" in toolkit_only.stderr


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_n_gpu_layers_on_the_installed_llama_cpp():
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (`make install-llamacpp`).")
    import llama_cpp

    from residlab.engines import open_engine

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RESIDLAB_CACHE", raising=False)
        if os.environ.get("RESIDLAB_REAL_CACHE"):
            mp.setenv("RESIDLAB_CACHE", os.environ["RESIDLAB_REAL_CACHE"])
        if not llama_cpp.llama_supports_gpu_offload():
            with pytest.raises(ResidlabError, match="without GPU support"):
                open_engine("qwen2.5-coder-0.5b-instruct", "llamacpp", n_gpu_layers=4)
            with open_engine("qwen2.5-coder-0.5b-instruct", "llamacpp") as engine:  # default: all where possible
                assert engine.n_gpu_layers == 0 and "@gpu" not in engine.identity
        else:
            with open_engine("qwen2.5-coder-0.5b-instruct", "llamacpp", n_gpu_layers=4) as engine:
                assert engine.identity.endswith("@gpu4")
                assert engine.generate("Say hi.", batch_size=1)[0].num_tokens > 0
