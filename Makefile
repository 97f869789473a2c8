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
install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[torch]"

install-dev: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"

demo: install
	$(BIN)/sparsedge pull smollm2-135m
	$(BIN)/sparsedge run smollm2-135m --chat -p "What is the capital of France?" --max-new-tokens 64

test: install-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf .venv build *.egg-info .pytest_cache
