#!/usr/bin/env bash
# Install llama-cpp-python (the llama.cpp engine) from a wheel built once on this machine.
# PyPI ships it as source only: the build takes a few minutes on 2 cores. The built wheel is kept in
# $RESIDLAB_CACHE/build-wheels/<cpu flags hash>[-noamx][-cuda]/ (llama.cpp compiles for the host CPU, so a
# wheel is only reused on a CPU with the same instruction set), and later installs take seconds.
#
# AMX: some (virtual) machines list AMX in CPUID but do not enable its tile state, so the first AMX
# instruction faults and llama.cpp, compiled with -march=native, crashes on its first matrix product
# (a general protection fault in ggml_backend_amx_mul_mat). A tiny probe runs one AMX instruction;
# where it fails, llama.cpp is built without AMX (every other native instruction kept).
#
# GPUs: where a CUDA toolkit (nvcc on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin) and an NVIDIA
# driver are present, the wheel is built with -DGGML_CUDA=on, so `--n-gpu-layers` offloads layers to the
# GPU; else a CPU build (a toolkit without a driver, as on a build box, also gets a CPU build).
# RESIDLAB_LLAMACPP_GPU=cuda|cpu overrides the choice; RESIDLAB_LLAMACPP_PRINT_FLAVOUR=1 prints the
# flavour this machine gets (cpu flavour native|noamx, prefixed cuda- for a CUDA build) and exits.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
PIN="$("$PYTHON" - <<'PY'
import pathlib, tomllib
extras = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["optional-dependencies"]
print(next(r for r in extras["llamacpp"] if r.startswith("llama-cpp-python")))
PY
)"
VERSION="${PIN##*==}"

amx_usable() {
  grep -qw amx_tile /proc/cpuinfo 2>/dev/null || return 1
  local dir rc
  dir="$(mktemp -d)"
  cat > "$dir/amx.c" <<'C'
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
  /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18), as ggml asks before using AMX */
  if (syscall(SYS_arch_prctl, 0x1023, 18)) return 1;
  unsigned char config[64];
  memset(config, 0, sizeof config);
  config[0] = 1;   /* palette 1 */
  config[16] = 64; /* tile 0: 64 bytes a row */
  config[48] = 16; /* tile 0: 16 rows */
  _tile_loadconfig(config);
  _tile_zero(0);
  _tile_release();
  return 0;
}
C
  # 0: AMX runs; 1: it faults; 2: no compiler here can build AMX code (then -march=native cannot emit
  # it either, and -mno-amx-* would be unknown options: keep the native build)
  rc=2
  if cc -O1 -mamx-tile -o "$dir/amx" "$dir/amx.c" 2>/dev/null; then
    rc=1
    # grouped, so that the shell's own "Illegal instruction" notice is silenced too
    { "$dir/amx"; } >/dev/null 2>&1 && rc=0
  fi
  rm -rf "$dir"
  return $rc
}

# The nvcc of a CUDA toolkit, or nothing.
find_nvcc() {
  local candidate
  for candidate in "$(command -v nvcc 2>/dev/null || true)" "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# An NVIDIA driver (a CUDA build of llama.cpp without one cannot even be imported: libcuda.so.1 is missing).
has_driver() {
  [ -e /dev/nvidiactl ] && return 0
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && return 0
  { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libcuda\.so\.1'
}

GPU="${RESIDLAB_LLAMACPP_GPU:-}"
NVCC=""
if [ -z "$GPU" ]; then
  GPU=cpu
  NVCC="$(find_nvcc || true)"
  if [ -n "$NVCC" ] && has_driver; then
    GPU=cuda
  elif [ -n "$NVCC" ]; then
    echo "a CUDA toolkit is here but no NVIDIA driver: building llama.cpp for the CPU" >&2
  fi
fi
case "$GPU" in cuda|cpu) ;; *) echo "RESIDLAB_LLAMACPP_GPU must be cuda or cpu, not '$GPU'" >&2; exit 2;; esac

CPU_FLAVOUR=native
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  probe=0
  amx_usable || probe=$?
  [ "$probe" = 1 ] && CPU_FLAVOUR=noamx
fi
FLAVOUR="$CPU_FLAVOUR"
[ "$GPU" = cuda ] && FLAVOUR="cuda-$CPU_FLAVOUR"
if [ -n "${RESIDLAB_LLAMACPP_PRINT_FLAVOUR:-}" ]; then
  echo "$FLAVOUR"
  exit 0
fi
CPU="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12 || echo generic)"
WHEELS="${RESIDLAB_CACHE:-$HOME/.cache/residlab}/build-wheels/$CPU"
# Which build this Python environment has, recorded beside the wheels (site-packages may be read-only
# or elsewhere), one marker per environment.
ENV_ID="$("$PYTHON" -c 'import sys; print(sys.prefix)' | md5sum | cut -c1-12)"
MARKER="$WHEELS.installed-flavour-$ENV_ID"
if "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null; then
  INSTALLED="$(cat "$MARKER" 2>/dev/null || echo native)"
  # a CPU machine keeps whatever CPU build it has (as before); a GPU machine wants its CUDA build
  if [ "$INSTALLED" = "$FLAVOUR" ] || { [ "$FLAVOUR" = native ] && [ "${INSTALLED#cuda-}" = "$INSTALLED" ]; }; then
    exit 0
  fi
  echo "the installed llama-cpp-python is a $INSTALLED build; this machine gets $FLAVOUR: rebuilding it" >&2
fi

CMAKE_EXTRA=""
if [ "$CPU_FLAVOUR" = noamx ]; then
  WHEELS="$WHEELS-noamx"
  # Explicit -mno-* flags win over -march=native whatever their order on GCC's command line.
  NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_EXTRA="-DCMAKE_C_FLAGS='$NOAMX' -DCMAKE_CXX_FLAGS='$NOAMX'"
  echo "this machine lists AMX but cannot run it: building llama.cpp without AMX" >&2
fi
if [ "$GPU" = cuda ]; then
  WHEELS="$WHEELS-cuda"
  CMAKE_EXTRA="$CMAKE_EXTRA -DGGML_CUDA=on"
  [ -n "$NVCC" ] && CMAKE_EXTRA="$CMAKE_EXTRA -DCMAKE_CUDA_COMPILER=$NVCC"
  echo "a CUDA toolkit is present: building llama.cpp with CUDA (--n-gpu-layers offloads layers to the GPU)" >&2
fi
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building $PIN from source once (a few minutes); the wheel is cached in $WHEELS" >&2
  CMAKE_ARGS="${CMAKE_ARGS:-} $CMAKE_EXTRA" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir "$PIN" -w "$WHEELS"
fi
# The wheel of this flavour exactly (never one pip cached from another build), then its dependencies.
"$PYTHON" -m pip install -q --force-reinstall --no-deps --no-index --find-links "$WHEELS" "$PIN"
"$PYTHON" -m pip install -q --find-links "$WHEELS" "$PIN"
mkdir -p "$(dirname "$MARKER")"
echo "$FLAVOUR" > "$MARKER"
