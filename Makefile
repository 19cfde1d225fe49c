# The two commands a new user needs (each installs what it needs into .venv first):
#   make serve   bring up a node serving the built-in demo model on http://127.0.0.1:9337/v1
#   make test    lint, type-check and run the whole test suite
# `make bench` runs every benchmark in bench/ (results in bench/results/, about an hour on 2 cores).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama.cpp is built from the llama-cpp-python sdist with its RPC backend and the project's patch
# (patches/: a split's stages read their tensors from their own GGUF). On x86-64 it is built for
# AVX2 rather than -march=native: llama.cpp's AMX kernels (picked by -march=native on Sapphire
# Rapids) segfault on Q8_0 weights (ggml-org/llama.cpp#20824). The wheel is kept per version, flags
# and patch, because pip's own cache ignores CMAKE_ARGS and would hand back another build.
LLAMA_VERSION := 0.3.36
LLAMA_PATCH := patches/llama.cpp-rpc-file-tensors.patch
LLAMA_CMAKE_ARGS := -DGGML_RPC=on
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS += -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif
WHEELS := $(HOME)/.cache/mesh-llm/wheels/$(shell (echo '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)'; cat $(LLAMA_PATCH)) | sha1sum | cut -c1-12)
# Re-install whenever the dependency lists, the build flags or the patch change.
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml Makefile $(LLAMA_PATCH) | sha1sum | cut -c1-12)
ARGS ?=

.PHONY: serve test bench install

print-%:  # a variable's value, for scripts (bench/_llama_tools.py builds llama.cpp's tools alike)
	@echo '$($*)'

install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# About 4 minutes the first time on 2 cores; later installs reuse the wheel.
	ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		bash patches/build-wheel.sh $(LLAMA_VERSION) $(LLAMA_PATCH) $(WHEELS) $(BIN)/python
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

serve: $(STAMP)
	$(BIN)/mesh-llm serve --host 127.0.0.1 $(ARGS)

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	@# If pytest dies (a signal from native code), say which test it was in and what it printed
	@# about it: CI shows only the end of the output.
	@bash -c 'set -o pipefail; MESH_LLM_TEST_TRACE=$(VENV)/pytest-running $(BIN)/python -m pytest $(ARGS) 2>&1 \
		| tee $(VENV)/pytest.log; rc=$$?; if [ $$rc -ne 0 ] && [ -s $(VENV)/pytest-running ]; then \
		echo "== pytest died (exit $$rc) in $$(cat $(VENV)/pytest-running); the crash, as printed:"; \
		grep -n -m12 -A8 -E "GGML_|Assertion|[Aa]bort|Fatal Python|double free|terminate called|Current thread" \
		$(VENV)/pytest.log | head -60; fi; exit $$rc'

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/overhead.py $(ARGS)
	$(BIN)/python bench/mesh.py
	$(BIN)/python bench/speculative.py
	$(BIN)/python bench/moe.py
	$(BIN)/python bench/split.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/elastic.py
