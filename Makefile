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
# llama.cpp (the peer every report compares against) compiles from source on the first install,
# about 13 minutes on 2 cores; pip caches the wheel afterwards.
install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[torch,llamacpp,peers]"

install-dev: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"

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
