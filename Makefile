# Set-up and entry points. `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnfree-installed

.PHONY: setup demo test lint typecheck unit slow bench clean

setup: $(STAMP)

# torch first (a CPU build of 2.13.0 lies on disk here), so nothing drags in a multi-GB CUDA build
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m attnfree.demo

lint: setup
	$(BIN)/ruff check src tests benchmarks

typecheck: setup
	$(BIN)/mypy src benchmarks

unit: setup
	$(BIN)/pytest -q --durations=10

test: lint typecheck unit

slow: setup
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
