# Entry points for a fresh machine. `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint train evaluate default-model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: train the default model when there is none, then evaluate it on the test split.
run: $(STAMP)
	@test -f runs/default/model.safetensors || $(BIN)/translator-train --out-dir runs/default
	$(BIN)/translator-eval --checkpoint runs/default --split test

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
