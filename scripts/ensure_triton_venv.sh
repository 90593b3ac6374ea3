#!/usr/bin/env bash
# Makes .venv-triton for the Triton reference of `make bench` (benchmarks/references/triton.py):
# nvidia-pytriton 0.7.0 bundles tritonserver 2.51 and its python backend; PyTriton pins numpy < 2, so
# it lives apart from the project's .venv. Idempotent; prints why and exits 0 when it cannot (the
# benchmark then reports Triton as not measured).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-triton
STAMP=$VENV/.installed
[[ -f $STAMP ]] && exit 0
PY=${PY:-python3}
if ! "$PY" -m venv "$VENV" >/dev/null 2>&1 || \
   ! "$VENV/bin/python" -m pip install --quiet nvidia-pytriton==0.7.0 onnxruntime==1.32.0; then
  echo "ensure_triton_venv: could not install nvidia-pytriton into $VENV; Triton will not be measured" >&2
  exit 0
fi
touch "$STAMP"
