# Two commands for a fresh machine with Python 3.11 and make:
#   make up     run the whole loop locally with the shipped example descriptions
#   make test   lint, type-check and run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every install is from a lock with hashes (pip and setuptools included), never from
# whatever is newest that day. `make lock` refreshes both locks from pyproject.toml.
LOCK   := requirements.txt
UV     := uv==0.13.8

.PHONY: up test lint bench bench-quick clean lock

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve the locks (the newest releases within pyproject.toml's ranges), then review
# the diff and run `make test` before committing them.
lock:
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet $(UV)
	.lock-venv/bin/uv pip compile --quiet --upgrade --universal --python-version 3.11 \
	  --generate-hashes pyproject.toml requirements-build.in --extra test -o requirements.txt
	.lock-venv/bin/uv pip compile --quiet --upgrade --universal --python-version 3.11 \
	  --generate-hashes pyproject.toml requirements-build.in -o requirements-runtime.txt
	rm -rf .lock-venv

up: $(STAMP)
	$(BIN)/mlsysops up --publish examples

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .lock-venv .mlsysops .pytest_cache .mypy_cache .ruff_cache
