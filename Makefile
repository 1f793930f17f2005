# Entry points for a fresh machine. `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: setup run test lint default-model performance

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Serving alone: numpy, onnxruntime, grpc, prometheus-client (no torch, no matplotlib).
$(SERVE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e .
	touch $(SERVE_STAMP)

# Everything: training, benchmarks, the client's pictures, the test tools.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: serve the shipped default model (model_repository/toy-en-es/1) on localhost.
run: $(SERVE_STAMP)
	$(BIN)/translator-serve --host 127.0.0.1

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/translator-bench performance --check
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# docs/PERFORMANCE.md from every run kept in docs/results/ (translator-bench engine/load --save).
performance: $(STAMP)
	$(BIN)/translator-bench performance

# Retrain the default model from scratch (fixed seeds: same data, same steps), evaluate it, and re-export it
# with its PyTorch checkpoint into checkpoints/ and model_repository/.
RUN := runs/default
SPLITS := test user names long
default-model: $(STAMP)
	rm -rf $(RUN)
	$(BIN)/translator-train --out-dir $(RUN)
	for split in $(SPLITS); do \
		$(BIN)/translator-eval --checkpoint $(RUN) --split $$split --json $(RUN)/eval-$$split.json || exit 1; \
	done
	mkdir -p checkpoints/toy-en-es
	cp $(RUN)/model.safetensors $(RUN)/config.json $(RUN)/tokenizer.json $(foreach s,$(SPLITS),$(RUN)/eval-$(s).json) \
		checkpoints/toy-en-es/
	$(BIN)/translator-export --checkpoint checkpoints/toy-en-es --repository model_repository --name toy-en-es \
		--version 1 $(foreach s,$(SPLITS),--metrics $(s)=$(RUN)/eval-$(s).json)
