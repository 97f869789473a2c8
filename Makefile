# The two first commands of the README. Both create .venv unless a virtual environment is active.
PY ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned in the extra; installing it explicitly first keeps pip from resolving another build.
install: $(BIN)/python llamacpp
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[torch,llamacpp,peers]"

install-dev: $(BIN)/python llamacpp
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"

# llama.cpp, the peer every report compares against, through llama-cpp-python, which compiles it
# from source (about 5 minutes on 2 cores without mtmd). Its default build is -march=native (GGML_NATIVE): on a
# Sapphire Rapids host that switches on ggml's AMX kernels, which segfault on every batch of two or
# more tokens (llama.cpp issue 20824), and pip caches the wheel by version only, so a wheel built on
# one CPU would be reused on the next machine's other CPU (SIGILL, or the wrong kernels). We build it
# ourselves with flags that name no host: x86-64 at the AVX2 + FMA + F16C + BMI2 baseline (every
# x86-64 CPU our users and machines have), no AVX-512, no AMX; aarch64 at ggml's portable ARMv8 base.
# The wheel goes into a folder of our own keyed by version and flags (never pip's cache), so every
# host that builds it builds the same wheel and a cached one is safe on any CPU. multimodal (mtmd)
# is left out: nothing here uses it, and it is minutes of the build.
LLAMACPP_VERSION := 0.3.36
ARCH := $(shell uname -m)
LLAMACPP_CMAKE_ARGS_COMMON := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DLLAVA_BUILD=OFF
ifeq ($(ARCH),x86_64)
LLAMACPP_CMAKE_ARGS := $(LLAMACPP_CMAKE_ARGS_COMMON) -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
	-DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
else
LLAMACPP_CMAKE_ARGS := $(LLAMACPP_CMAKE_ARGS_COMMON)
endif
LLAMACPP_KEY := $(shell echo "$(LLAMACPP_VERSION) $(ARCH) $(LLAMACPP_CMAKE_ARGS)" | sha256sum | cut -c1-12)
WHEEL_CACHE ?= $(or $(SPARSEDGE_HOME),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/sparsedge)/wheels
LLAMACPP_WHEELS := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMACPP_VERSION)-$(ARCH)-$(LLAMACPP_KEY)
LLAMACPP_STAMP := $(VENV)/.llama-cpp-python-$(LLAMACPP_KEY)

.PHONY: llamacpp
llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! ls $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMACPP_VERSION) (llama.cpp from source, ~5 min on 2 cores)"; \
		echo "  CMAKE_ARGS=$(LLAMACPP_CMAKE_ARGS)"; \
		rm -rf $(LLAMACPP_WHEELS).tmp && mkdir -p $(LLAMACPP_WHEELS).tmp && \
		CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" FORCE_CMAKE=1 $(BIN)/python -m pip wheel -q --no-deps \
			--no-cache-dir --no-binary llama-cpp-python -w $(LLAMACPP_WHEELS).tmp \
			"llama-cpp-python==$(LLAMACPP_VERSION)" && \
		echo "$(LLAMACPP_CMAKE_ARGS)" > $(LLAMACPP_WHEELS).tmp/CMAKE_ARGS && \
		rm -rf $(LLAMACPP_WHEELS) && mv $(LLAMACPP_WHEELS).tmp $(LLAMACPP_WHEELS); \
	fi
	$(BIN)/python -m pip install -q --force-reinstall --no-deps $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install -q "llama-cpp-python==$(LLAMACPP_VERSION)"
	rm -f $(VENV)/.llama-cpp-python-* && touch $@

# The main job on the built-in model: pull -> calibrate a sparsity recipe -> export for this host's
# device profile -> chat with the fastest lossless configuration (the profile's runtime, n-gram
# speculative decoding) -> a quick bench report (dense vs the recipe, speculative vs plain, peers)
# in $(DEMO)/report/report.md. About 10 minutes after installation on 2 cores.
DEMO ?= demo
demo: install
	$(BIN)/sparsedge pull smollm2-135m
	$(BIN)/sparsedge calibrate smollm2-135m --method teal --sparsity 0.5 --scope ffn --calib-tokens 4096 \
		-o $(DEMO)/teal50.json
	$(BIN)/sparsedge export smollm2-135m --target host -o $(DEMO)/artifact --force
	$(BIN)/sparsedge run $(DEMO)/artifact --chat -p "Write a Python function that reverses a string." \
		--max-new-tokens 96 --decode spec --drafter ngram
	$(BIN)/sparsedge bench smollm2-135m --quick --recipes $(DEMO)/teal50.json -o $(DEMO)/report
	@echo "report: $(DEMO)/report/report.md"

test: install-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf .venv build *.egg-info .pytest_cache $(DEMO)
