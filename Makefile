# Set-up and entry points. `make demo` and `make test` each set everything up on a fresh machine.
#
# Three environments, one suite:
#   make test         .venv         the locked versions (requirements/lock.txt): what CI and `make demo` run
#   make test-latest  .venv-latest  the newest versions pyproject.toml allows (re-resolved on every call)
#   make test-floor   .venv-floor   the lowest versions pyproject.toml allows (requirements/floor.txt)
#   make lock         refresh requirements/lock.txt from pyproject.toml (uv pip compile)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# pip constraints for the install: the lock by default; empty for the newest versions
CONSTRAINTS ?= requirements/lock.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnfree-installed
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),--upgrade --upgrade-strategy eager)

.PHONY: setup demo test test-latest test-floor lock lint typecheck unit slow bench clean gpu-check

setup: $(STAMP)

# torch first (a CPU build of 2.13.0 lies on disk here), so nothing drags in a multi-GB CUDA build
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q $(CONSTRAINT_FLAG) "$(TORCH)" -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: setup
	$(BIN)/python -m attnfree.demo

lint: setup
	$(BIN)/ruff check src tests benchmarks

typecheck: setup
	$(BIN)/mypy src benchmarks

unit: setup
	$(BIN)/pytest -q -n auto --durations=10

test: lint typecheck unit

# The newest versions the ranges allow: upgraded on every call, since the registries move.
test-latest:
	rm -f .venv-latest/.attnfree-installed
	$(MAKE) VENV=.venv-latest CONSTRAINTS= setup
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(transformers|accelerate|datasets|tokenizers|huggingface.hub|lm.eval|onnx|onnxscript|onnxruntime|fastapi|numpy)=='
	$(MAKE) VENV=.venv-latest CONSTRAINTS= test

# The lowest versions the ranges allow (requirements/floor.txt, which tests/test_packaging.py keeps in step): the
# suite runs there; the type check runs against the locked and the newest versions (stubs differ in old releases).
test-floor:
	$(MAKE) VENV=.venv-floor CONSTRAINTS=requirements/floor.txt unit

# Refresh the lock: the newest versions the ranges allow, resolved against requirements/torch.txt (torch itself is
# installed from $(TORCH), so it is left out of the lock). Commit the result after `make test` passes on it.
lock: setup
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	  --python-platform x86_64-unknown-linux-gnu $(if $(wildcard /opt/wheels),--find-links /opt/wheels,) \
	  --constraint requirements/torch.txt --no-emit-package torch -o requirements/lock.txt

# On a CUDA machine (a venv whose torch sees the GPU, with the triton extra: make gpu-check VENV=that-venv): the
# kernels' CUDA tests, then a compact benchmark into $$GPU_CHECK_DIR (default runs/gpu-check), in minutes.
# Without a GPU it says so in one line and exits 0.
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check

slow: setup
	$(BIN)/pytest -q -n auto -m slow

clean:
	rm -rf $(VENV) .venv-latest .venv-floor build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
