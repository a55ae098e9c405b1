#!/bin/bash
# Time `residlab compress` (what `make demo` runs) as on a 2-core CPU without AVX-512, on a machine that has it:
# llama.cpp built for AVX2 only (no AVX-512, AMX or AVX-VNNI) and installed into a side folder, torch's own kernels,
# oneDNN and MKL capped at AVX2 (which also makes `--dtype auto` pick float32: oneDNN then reports no native bf16).
# Writes the log and /usr/bin/time's summary to benchmarks/results/demo_noavx512.log; the stage seconds are in the
# run's report.json (`stage_seconds`). Needs `make install` done and the default model cached.
#   bash benchmarks/demo_noavx512.sh [extra compress options]
set -euo pipefail
SIDE="${RESIDLAB_NOAVX512_DIR:-$HOME/.cache/residlab/noavx512}"
VERSION="$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
if [ ! -d "$SIDE/site/llama_cpp" ]; then
  mkdir -p "$SIDE"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX_VNNI=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip wheel -q --no-deps --no-cache-dir \
    "llama-cpp-python==$VERSION" -w "$SIDE"
  python -m pip install -q --no-deps --target "$SIDE/site" "$SIDE"/llama_cpp_python-"$VERSION"-*.whl
fi
export PYTHONPATH="$SIDE/site${PYTHONPATH:+:$PYTHONPATH}"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
python -c "import llama_cpp, torch; print(llama_cpp.llama_print_system_info().decode()); \
print('torch kernels', torch.backends.cpu.get_cpu_capability(), 'native bf16', torch.ops.mkldnn._is_mkldnn_bf16_supported())"
WORK="$(mktemp -d)"
OUT="$(dirname "$0")/results/demo_noavx512.log"
/usr/bin/time -v python -c "from residlab.cli.main import app; app()" compress --work-dir "$WORK" "$@" 2>&1 | tee "$OUT"
python -c "import json,sys; print('stage seconds', json.load(open(sys.argv[1]))['stage_seconds'])" \
  "$WORK"/*/report.json | tee -a "$OUT"
