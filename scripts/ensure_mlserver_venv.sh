#!/usr/bin/env bash
# Makes .venv-mlserver for the MLServer reference of `make bench` (benchmarks/references/mlserver.py):
# Seldon MLServer 1.7.1 and ONNX Runtime, kept apart from the project's .venv (MLServer brings its own
# pins: FastAPI, uvicorn, ...). Idempotent; prints why and exits 0 when it cannot (the benchmark then
# reports MLServer as not measured).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-mlserver
STAMP=$VENV/.installed
[[ -f $STAMP ]] && exit 0
PY=${PY:-python3}
if ! "$PY" -m venv "$VENV" >/dev/null 2>&1 || \
   ! "$VENV/bin/python" -m pip install --quiet mlserver==1.7.1 onnxruntime==1.32.0; then
  echo "ensure_mlserver_venv: could not install mlserver into $VENV; MLServer will not be measured" >&2
  exit 0
fi
touch "$STAMP"
