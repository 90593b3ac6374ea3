# vae-serve: every target creates .venv/ and installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
EXPORT_DIR ?= exported

.PHONY: demo test test-fast venv clean bench lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,serve,dev]'
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	bash scripts/ensure_system_tools.sh prometheus promtool h2load
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

bench: $(STAMP)
	bash scripts/ensure_system_tools.sh h2load
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check training serving tests benchmarks
	$(BIN)/mypy serving

clean:
	rm -rf $(VENV) runs
