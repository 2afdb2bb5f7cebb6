# Story Vault: `make run` and `make test` bootstrap everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench bench-soak bench-scale run-cluster clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/storyvault serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/bandit -q -r api governance consent policies audit -lll

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest -n 2

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-soak: $(STAMP)
	$(BIN)/python -m bench.run --soak 600

bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale

run-cluster: $(STAMP)
	$(BIN)/python docker/cluster.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
