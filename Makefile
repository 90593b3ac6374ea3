# vae-serve: every target creates .venv/ and installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
EXPORT_DIR ?= exported

.PHONY: demo test test-fast venv clean bench lint image image-gpu image-test

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
	bash scripts/ensure_reference_venvs.sh
	$(BIN)/python -m benchmarks.run

# The serving image (deploy/Dockerfile) with docker, else podman/buildah; offline-capable (scripts/build_image.sh).
#   make image [MODEL_DIR=exported]      -> vae-serve:cpu;  make image-gpu -> vae-serve:gpu (needs a CUDA base)
IMAGE_TOOLS := podman buildah runc catatonit mmdebstrap
image:
	bash scripts/ensure_system_tools.sh $(IMAGE_TOOLS)
	MODEL_DIR="$(MODEL_DIR)" bash scripts/build_image.sh cpu

image-gpu:
	bash scripts/ensure_system_tools.sh $(IMAGE_TOOLS)
	MODEL_DIR="$(MODEL_DIR)" bash scripts/build_image.sh gpu

# Builds vae-serve:cpu and runs it with podman: hardened run, RPCs, drain, tampered model, kube play.
image-test: $(STAMP)
	bash scripts/ensure_system_tools.sh $(IMAGE_TOOLS)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/integration/image_checks.py

# The whole tree: ruff, mypy (files and per-package strictness in pyproject.toml), no import cycles, and the
# generated sections of docs/ARCHITECTURE.md current (python scripts/gen_docs.py rewrites them).
lint: $(STAMP)
	$(BIN)/ruff check training serving loadgen deploy scripts tests benchmarks
	$(BIN)/mypy
	$(BIN)/python scripts/check_imports.py
	$(BIN)/python scripts/gen_docs.py --check

clean:
	rm -rf $(VENV) runs
