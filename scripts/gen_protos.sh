#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf code under serving/_proto/ from protos/.
#   bash scripts/gen_protos.sh            # writes into the repository
#   OUT_DIR=/tmp/x bash scripts/gen_protos.sh   # writes elsewhere (the no-diff test uses this)
# The include mapping -Iserving/_proto=protos makes the generated imports absolute
# (`from serving._proto.vae.v1 import ...`) with no hand-patching.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT_DIR="${OUT_DIR:-.}"
mkdir -p "$OUT_DIR"
for proto in protos/vae/v1/vae_service.proto protos/inference/grpc_service.proto; do
  "$PY" -m grpc_tools.protoc -Iserving/_proto=protos \
    --python_out="$OUT_DIR" --pyi_out="$OUT_DIR" --grpc_python_out="$OUT_DIR" "$proto"
done
# Package markers so the generated modules import as serving._proto.<package>.
for d in serving/_proto serving/_proto/vae serving/_proto/vae/v1 serving/_proto/inference; do
  mkdir -p "$OUT_DIR/$d"
  touch "$OUT_DIR/$d/__init__.py"
done
