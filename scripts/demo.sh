#!/usr/bin/env bash
# `make demo`: the whole product, end to end, on scikit-learn's bundled digits.
#   1. train a VAE (python -m training.fit), 2. evaluate it on the test split (IWAE bound),
#   3. export it to ONNX behind the parity gate, 4. serve it (python -m serving),
#   5. call every RPC through the client (PNG grids), 6. show metrics, 7. stop the server cleanly.
# Outputs: runs/demo/ (run directory, figures), exported/ (the model), runs/demo/serve/ (client outputs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/demo}
EXPORT_DIR=${EXPORT_DIR:-exported}
SERVE_DIR="$RUN_DIR/serve"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/7 train on digits -> $RUN_DIR"
rm -rf "$RUN_DIR"
"$PY" -m training.fit --data digits --out "$RUN_DIR" --no-progress

step "2/7 evaluate on the test split"
"$PY" -m training.evaluate --run "$RUN_DIR" --k 1000

step "3/7 export to ONNX -> $EXPORT_DIR (parity gate vs PyTorch)"
"$PY" -m training.export --run "$RUN_DIR" --out "$EXPORT_DIR"

step "4/7 start the server"
mkdir -p "$SERVE_DIR"
ready="$SERVE_DIR/ready.json"
rm -f "$ready"
"$PY" -m serving --model-dir "$EXPORT_DIR" --host 127.0.0.1 --port 0 --http-port 0 \
    --ready-file "$ready" >"$SERVE_DIR/server.log" 2>&1 &
server_pid=$!
cleanup() { kill -TERM "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 300); do
    [ -s "$ready" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$SERVE_DIR/server.log"; echo "server exited early" >&2; exit 1; }
    sleep 0.1
done
[ -s "$ready" ] || { cat "$SERVE_DIR/server.log"; echo "server not SERVING after 30 s" >&2; exit 1; }
read -r grpc_port http_port < <("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["grpc_port"], d["http_port"])' "$ready")
target="127.0.0.1:$grpc_port"
echo "SERVING on $target (HTTP: REST API and metrics on 127.0.0.1:$http_port, pid $server_pid)"

step "5/7 call every RPC through the client"
# Eight real test-split digits, in model space, as the input of Encode and Reconstruct.
"$PY" - "$RUN_DIR" "$SERVE_DIR/x.npy" <<'EOF'
import json, sys
import numpy as np
from training.config import TrainConfig
from training.data import load_data
config = TrainConfig.from_dict(json.load(open(f"{sys.argv[1]}/config.json")))
np.save(sys.argv[2], load_data(config).test[:8].numpy())
EOF
client=("$PY" -m serving.client --target "$target")
"${client[@]}" info
"${client[@]}" encode --input "$SERVE_DIR/x.npy" --output "$SERVE_DIR/encoded.npz"
"${client[@]}" sample --count 64 --seed 0 --png "$SERVE_DIR/samples.png"
"${client[@]}" reconstruct --input "$SERVE_DIR/x.npy" --png "$SERVE_DIR/reconstructions.png"
"${client[@]}" decode --input "$SERVE_DIR/encoded.npz" --png "$SERVE_DIR/decoded.png"
# The same encoder over the Open Inference Protocol's REST API (JSON), as curl or tritonclient.http send it.
"$PY" - "$http_port" "$SERVE_DIR/x.npy" <<'EOF'
import json, sys, urllib.request
import numpy as np
x = np.load(sys.argv[2])[:2].astype(np.float32)
body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
                   "outputs": [{"name": "mu"}]}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v2/models/encoder/infer", data=body,
                             headers={"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=10))["outputs"][0]
print(f"POST /v2/models/encoder/infer: {out['name']} shape {out['shape']}, first values {np.round(out['data'][:4], 3)}")
EOF

step "6/7 a few metrics from http://127.0.0.1:$http_port/metrics"
"$PY" - "$http_port" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(("vae_requests_total", "vae_rows_total", "vae_batches_total", "vae_model_info",
                        "vae_batch_size_rows_count", "vae_request_duration_seconds_count")):
        print(line)
EOF

step "7/7 stop the server (SIGTERM, graceful)"
trap - EXIT
kill -TERM "$server_pid"
rc=0; wait "$server_pid" || rc=$?
tail -n 3 "$SERVE_DIR/server.log"
[ "$rc" -eq 0 ] || { echo "server exited $rc" >&2; exit 1; }
echo
echo "demo done: run directory $RUN_DIR (samples.png, reconstructions.png, curves.png, interpolation.png,"
echo "summary.json), model $EXPORT_DIR/, client outputs $SERVE_DIR/ (samples.png, reconstructions.png, decoded.png)"
