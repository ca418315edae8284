# Set-up and everyday commands. Each target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; pinned first so that nothing later pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: quickstart test lint format generate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --editable '.[operator,trainer,dev]'
	touch $@

quickstart: $(VENV)/.installed  ## set up, then train the quickstart model (out/quickstart/)
	$(BIN)/difftrain run examples/quickstart.yaml

test: $(VENV)/.installed  ## set up, then lint and run the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

generate: $(VENV)/.installed  ## rewrite the generated files (CRD, API reference)
	$(BIN)/difftrain crd
	$(BIN)/difftrain reference

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
