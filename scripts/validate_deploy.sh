#!/usr/bin/env bash
# Validate deploy/ offline with real tools:  bash scripts/validate_deploy.sh [STEP ...]
#
# Steps (default: all, in this order):
#   render      render each overlay (deploy/k8s/overlays/*) with `kubectl kustomize`, or with
#               deploy/k8s/render.py when kubectl is absent (VAE_DEPLOY_RENDERER=kubectl|python forces one)
#   kubernetes  kubernetes-validate --strict for every built-in kind, against each of KUBE_VERSIONS
#               (default "1.31.0 1.34.0": 1.31 is the oldest supported cluster: native gRPC probes
#               GA 1.27, preStop sleep action on by default 1.30); a kind without a schema fails
#   monitoring  CRDs and wiring (deploy/k8s/check_monitoring.py) + PrometheusRule up to date with rules.yml
#   promtool    promtool check rules (rules.yml, each rendered PrometheusRule spec, adapter queries)
#               and promtool test rules deploy/prometheus/rules_test.yml
#   requestcap  the request-size cap at the proxy (deploy/k8s/check_request_cap.py, each rendered overlay):
#               every Ingress to the server carries --max-message-bytes + 64 KiB and the NetworkPolicy admits
#               requests only through the proxy; overlays without an Ingress (the cap is optional) pass
#   kserve      render deploy/kserve and deploy/kserve/multimodel (same renderer), deploy/kserve/check_kserve.py
#               (KServe CRD fields and wiring, TrainedModels included, by hand: no schema exists offline) and
#               kubernetes-validate --strict of each runtime's pod
#   repository  render deploy/k8s/examples/repository-poll (the poll-mode model repository with its CronJob),
#               deploy/k8s/check_repository.py (its wiring) and kubernetes-validate --strict of its objects
#   hadolint    hadolint deploy/Dockerfile
# Rendered files go to VALIDATE_OUT (default: a fresh temporary directory). Exit status 0 = all passed.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
PY=$BIN/python; [[ -x $PY ]] || PY=python3
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.31.0 1.34.0"}
if [[ -n ${VALIDATE_OUT:-} ]]; then OUT=$VALIDATE_OUT; else OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; fi
mkdir -p "$OUT"
OVERLAYS=(deploy/k8s/overlays/*/)

tool() {  # the venv's copy of a tool, else the one on PATH
  if [[ -x $BIN/$1 ]]; then echo "$BIN/$1"; elif command -v "$1" >/dev/null; then command -v "$1"
  else echo "validate_deploy: $1 not found (install it: see scripts/ensure_system_tools.sh)" >&2; return 1; fi
}

render_dir() {  # render_dir KUSTOMIZATION_DIR OUT_FILE
  local renderer=${VAE_DEPLOY_RENDERER:-}
  if [[ -z $renderer ]]; then
    if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then renderer=kubectl
    else renderer=python; fi
  fi
  if [[ $renderer == kubectl ]]; then kubectl kustomize "$1" >"$2"
  else "$PY" deploy/k8s/render.py "$1" >"$2"; fi
  echo "render: $1 -> $2 ($renderer, $(grep -c '^kind:' "$2") objects)"
}

step_render() {
  for dir in "${OVERLAYS[@]}"; do render_dir "$dir" "$OUT/$(basename "$dir").yaml"; done
}

rendered() { for dir in "${OVERLAYS[@]}"; do echo "$OUT/$(basename "$dir").yaml"; done; }
need_rendered() { for f in $(rendered); do [[ -s $f ]] || step_render; done; }

step_kubernetes() {
  need_rendered
  local kv; kv=$(tool kubernetes-validate)
  for f in $(rendered); do
    # Built-in kinds to kubernetes-validate; the Prometheus Operator's CRDs are the monitoring step's job.
    "$PY" - "$f" "${f%.yaml}.builtin.yaml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
open(sys.argv[2], "w").write(yaml.safe_dump_all(builtin, sort_keys=False))
PYEOF
    for v in $KUBE_VERSIONS; do
      local log; log=$("$kv" --strict --kubernetes-version "$v" "${f%.yaml}.builtin.yaml" 2>&1) || { echo "$log"; return 1; }
      echo "$log"
      if grep -q "Couldn't find schema" <<<"$log"; then echo "kubernetes: a built-in kind has no schema" >&2; return 1; fi
    done
  done
}

step_monitoring() {
  need_rendered
  "$PY" deploy/prometheus/render_prometheusrule.py --check
  echo "monitoring: deploy/k8s/base/prometheusrule.yaml is up to date with deploy/prometheus/rules.yml"
  for f in $(rendered); do "$PY" deploy/k8s/check_monitoring.py "$f" --out "${f%.yaml}.promtool"; done
}

step_promtool() {
  local pt; pt=$(tool promtool)
  "$pt" check rules deploy/prometheus/rules.yml
  (cd deploy/prometheus && "$pt" test rules rules_test.yml)
  need_rendered
  for f in $(rendered); do
    [[ -d ${f%.yaml}.promtool ]] || "$PY" deploy/k8s/check_monitoring.py "$f" --out "${f%.yaml}.promtool"
    "$pt" check rules "${f%.yaml}".promtool/*.yml
  done
}

step_requestcap() {
  need_rendered
  for f in $(rendered); do "$PY" deploy/k8s/check_request_cap.py "$f"; done
}

step_kserve() {
  local kv; kv=$(tool kubernetes-validate)
  for dir in deploy/kserve deploy/kserve/multimodel; do
    local name; name=$(basename "$dir")
    render_dir "$dir" "$OUT/$name.yaml"
    "$PY" deploy/kserve/check_kserve.py "$OUT/$name.yaml" --out "$OUT/$name"
    for v in $KUBE_VERSIONS; do "$kv" --strict --kubernetes-version "$v" "$OUT/$name/kserve-pod.yaml"; done
  done
}

step_repository() {
  local f=$OUT/repository-poll.yaml kv; kv=$(tool kubernetes-validate)
  render_dir deploy/k8s/examples/repository-poll "$f"
  "$PY" deploy/k8s/check_repository.py "$f"
  "$PY" - "$f" "${f%.yaml}.builtin.yaml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
open(sys.argv[2], "w").write(yaml.safe_dump_all(builtin, sort_keys=False))
PYEOF
  for v in $KUBE_VERSIONS; do "$kv" --strict --kubernetes-version "$v" "${f%.yaml}.builtin.yaml"; done
}

step_hadolint() {
  local hl; hl=$(tool hadolint)
  "$hl" deploy/Dockerfile
  echo "hadolint: deploy/Dockerfile clean ($("$hl" --version))"
}

steps=("$@"); [[ ${#steps[@]} -gt 0 ]] || steps=(render kubernetes monitoring promtool requestcap kserve repository hadolint)
for s in "${steps[@]}"; do
  declare -F "step_$s" >/dev/null || { echo "validate_deploy: unknown step $s" >&2; exit 2; }
  echo "== $s"
  "step_$s"
done
echo "validate_deploy: OK (${steps[*]})"
