# The two commands of the README: `make demo` (main job on the default model) and `make test`.
PYTHON ?= python3
# torch is pinned: an open-ended requirement would pull a multi-GB CUDA build.
INSTALL = $(PYTHON) -m pip install -q "torch==2.13.0" -e ".[dev]"

.PHONY: install demo test lint bench

install:
	$(INSTALL)

demo: install
	residlab compress

test: install
	$(PYTHON) -m pytest

lint:
	ruff check src tests benchmarks

bench: install
	$(PYTHON) benchmarks/generation_speed.py
