#!/usr/bin/env bash
# Makes the venvs of `make bench`'s reference systems, each apart from the project's .venv (their own pins):
#   .venv-triton    nvidia-pytriton 0.7.0 (bundles tritonserver 2.51 and its python backend; PyTriton pins
#                   numpy < 2) + onnxruntime, for benchmarks/references/triton.py
#   .venv-mlserver  Seldon MLServer 1.7.1 + onnxruntime, for benchmarks/references/mlserver.py
# Idempotent; where one cannot be made it says why and goes on (exit 0): the benchmark then reports that
# system as not measured, never estimated.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

ensure() {  # VENV NAME PIP_SPEC...
  local venv=$1 name=$2; shift 2
  [[ -f $venv/.installed ]] && return 0
  if ! "$PY" -m venv "$venv" >/dev/null 2>&1 || ! "$venv/bin/python" -m pip install --quiet "$@"; then
    echo "ensure_reference_venvs: could not install $* into $venv; $name will not be measured" >&2
    return 0
  fi
  touch "$venv/.installed"
}

ensure .venv-triton Triton nvidia-pytriton==0.7.0 onnxruntime==1.32.0
ensure .venv-mlserver MLServer mlserver==1.7.1 onnxruntime==1.32.0
