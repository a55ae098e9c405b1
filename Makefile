# The two commands of the README: `make demo` (main job on the default model) and `make test`.
# `make install` includes llama-cpp-python (the fast engine), built from source once and cached.
PYTHON ?= python3
# The exact CPU build of torch is pinned here, not in pyproject.toml (which declares a range that it
# satisfies, so nothing more is installed): pip resolving the range alone would pull a multi-GB CUDA build.
INSTALL = $(PYTHON) -m pip install -q "torch==2.13.0" -e ".[dev,sae,lab,ray]"

.PHONY: install install-llamacpp demo test lint bench

install:
	$(INSTALL)
	PYTHON=$(PYTHON) bash scripts/install-llamacpp.sh
	# Debian's Chromium renders the SAE dashboard in tests/test_saes_dashboard.py (skipped without it).
	command -v chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "warning: could not install chromium; the SAE dashboard browser test will be skipped"

demo: install
	residlab compress

test: install
	$(PYTHON) -m pytest

lint: install
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	$(PYTHON) -m mypy
	lint-imports

# The llama.cpp engine alone (also part of `make install`): builds llama-cpp-python once, then reuses the wheel.
install-llamacpp:
	PYTHON=$(PYTHON) bash scripts/install-llamacpp.sh

bench: install
	$(PYTHON) benchmarks/generation_speed.py
	$(PYTHON) benchmarks/engines.py
