# The two commands a new user needs (each installs what it needs into .venv first):
#   make serve   bring up a node serving the built-in demo model on http://127.0.0.1:9337/v1
#   make test    lint, type-check and run the whole test suite
# `make bench` runs the benchmarks in bench/ (results in bench/results/, about 15 minutes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install whenever the dependency lists change.
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)
ARGS ?=

.PHONY: serve test bench install

install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama.cpp is built from source with its RPC backend (about 4 minutes the first time; pip caches it).
	CMAKE_ARGS="-DGGML_RPC=on" $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

serve: $(STAMP)
	$(BIN)/mesh-llm serve --host 127.0.0.1 $(ARGS)

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	CMAKE_ARGS="-DGGML_RPC=on" $(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/overhead.py $(ARGS)
	$(BIN)/python bench/mesh.py
