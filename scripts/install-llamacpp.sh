#!/usr/bin/env bash
# Install llama-cpp-python (the llama.cpp engine) from a wheel built once on this machine.
# PyPI ships it as source only: the build takes a few minutes on 2 cores. The built wheel is kept in
# $RESIDLAB_CACHE/build-wheels/<cpu flags hash>/ (llama.cpp compiles for the host CPU, so a wheel is
# only reused on a CPU with the same instruction set), and later installs take seconds.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
PIN="$("$PYTHON" - <<'PY'
import pathlib, tomllib
extras = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["optional-dependencies"]
print(next(r for r in extras["llamacpp"] if r.startswith("llama-cpp-python")))
PY
)"
VERSION="${PIN##*==}"
if "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null; then
  exit 0
fi
CPU="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12 || echo generic)"
WHEELS="${RESIDLAB_CACHE:-$HOME/.cache/residlab}/build-wheels/$CPU"
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building $PIN from source once (a few minutes); the wheel is cached in $WHEELS" >&2
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PYTHON" -m pip wheel -q --no-deps "$PIN" -w "$WHEELS"
fi
"$PYTHON" -m pip install -q --find-links "$WHEELS" "$PIN"
