"""Check the KServe objects offline: known fields, the wiring between them and the image, the pod they make.

    python deploy/kserve/check_kserve.py RENDERED.yaml --out DIR

kubernetes-validate has no schemas for KServe's CRDs, so this script checks by hand, and exits 1 listing
every failure:
  - ServingRuntime / InferenceService: only fields of KServe's v1alpha1 / v1beta1 API (lists below, taken
    from kserve/kserve pkg/apis/serving), protocol grpc-v2, the model format and runtime names agree;
  - the runtime container: a port named h2c (KServe routes gRPC there) that is ServeConfig's gRPC port,
    the Prometheus annotation on ServeConfig's metrics port, gRPC probes on that port for names the server's
    health service answers;
  - a multi-model runtime (`multiModel: true`, deploy/kserve/multimodel): its first port is ServeConfig's
    HTTP port (KServe's agent loads models there over REST) and it speaks v2; the InferenceService has no
    storageUri of its own; each TrainedModel has only KServe's v1alpha1 fields, names that
    InferenceService, a framework the runtime supports, a storageUri and memory, and a name the model
    repository accepts (serving/layout.py: the name clients see as <name>.encoder);
  - DIR/kserve-pod.yaml: the runtime's containers and volumes as a Pod, for `kubernetes-validate --strict`
    (the built-in schema covers every container field: probes, securityContext, resources, mounts).
The container's VAE_SERVE_* env is checked by deploy/server_env.py --check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from serving.config import ServeConfig
from serving.layout import LayoutError, check_name
from serving.server import HEALTH_NAMES

Obj = dict[str, Any]
RUNTIME_SPEC_KEYS = {"supportedModelFormats", "multiModel", "disabled", "protocolVersions", "grpcEndpoint",
                     "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter",
                     "containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels", "annotations",
                     "imagePullSecrets", "hostIPC", "workerSpec"}
MODEL_FORMAT_KEYS = {"name", "version", "autoSelect", "priority"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
PREDICTOR_KEYS = {"model", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                  "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
                  "annotations", "deploymentStrategy", "autoScaling", "serviceAccountName", "nodeSelector",
                  "tolerations", "affinity", "volumes", "imagePullSecrets", "priorityClassName", "workerSpec"}
TRAINED_MODEL_SPEC_KEYS = {"inferenceService", "model"}
TRAINED_MODEL_MODEL_KEYS = {"storageUri", "framework", "memory"}
MODEL_KEYS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage", "env", "args", "resources",
              "ports", "volumeMounts", "securityContext", "livenessProbe", "readinessProbe", "startupProbe"}


def check(docs: list[Obj], out: Path) -> list[str]:
    """Every failure in the rendered KServe objects (empty when consistent); writes DIR/kserve-pod.yaml."""
    errors: list[str] = []
    by_kind = {d["kind"]: d for d in docs}
    rt, isvc = by_kind["ServingRuntime"], by_kind["InferenceService"]
    if rt["apiVersion"] != "serving.kserve.io/v1alpha1" or isvc["apiVersion"] != "serving.kserve.io/v1beta1":
        errors.append("apiVersions: expected serving.kserve.io/v1alpha1 ServingRuntime, v1beta1 InferenceService")
    spec = rt["spec"]
    errors += [f"ServingRuntime.spec.{k}: unknown field" for k in set(spec) - RUNTIME_SPEC_KEYS]
    for f in spec["supportedModelFormats"]:
        errors += [f"ServingRuntime supportedModelFormats.{k}: unknown field" for k in set(f) - MODEL_FORMAT_KEYS]
    if "grpc-v2" not in spec["protocolVersions"] or set(spec["protocolVersions"]) - PROTOCOLS:
        errors.append(f"ServingRuntime.spec.protocolVersions: expected grpc-v2 of {PROTOCOLS}, got {spec['protocolVersions']}")

    pred = isvc["spec"]["predictor"]
    errors += [f"InferenceService.spec.predictor.{k}: unknown field" for k in set(pred) - PREDICTOR_KEYS]
    model = pred["model"]
    errors += [f"InferenceService predictor.model.{k}: unknown field" for k in set(model) - MODEL_KEYS]
    if model.get("runtime") != rt["metadata"]["name"]:
        errors.append(f"InferenceService runtime {model.get('runtime')!r} != ServingRuntime {rt['metadata']['name']!r}")
    fmt = {k: model["modelFormat"].get(k) for k in ("name", "version")}
    if fmt not in [{k: f.get(k) for k in ("name", "version")} for f in spec["supportedModelFormats"]]:
        errors.append(f"InferenceService modelFormat {fmt} is not a supportedModelFormat of the runtime")
    if model.get("protocolVersion") not in spec["protocolVersions"]:
        errors.append(f"InferenceService protocolVersion {model.get('protocolVersion')!r} not served by the runtime")

    defaults = ServeConfig()
    (c,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if spec.get("multiModel"):
        errors += _multimodel(docs, spec, isvc, c, defaults)
    elif ports.get("h2c") != defaults.port:
        errors.append(f"runtime container: port h2c {ports.get('h2c')} != ServeConfig port {defaults.port}")
    if spec["annotations"].get("prometheus.kserve.io/port") != str(defaults.http_port):
        errors.append(f"prometheus.kserve.io/port != ServeConfig http_port {defaults.http_port}")
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        g = c.get(name, {}).get("grpc")
        if g is None or g["port"] != defaults.port or g.get("service", "") not in HEALTH_NAMES:
            errors.append(f"runtime container {name}: expected grpc on {defaults.port} for one of {HEALTH_NAMES}")

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-runtime-pod"},
           "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "kserve-pod.yaml").write_text(yaml.safe_dump(pod, sort_keys=False))
    return errors


def _multimodel(docs: list[Obj], spec: Obj, isvc: Obj, c: Obj, defaults: ServeConfig) -> list[str]:
    """The multi-model runtime, its InferenceService and every TrainedModel."""
    errors: list[str] = []
    if c["ports"][0]["containerPort"] != defaults.http_port or "v2" not in spec["protocolVersions"]:
        errors.append(f"multi-model runtime: expected v2 and the HTTP port {defaults.http_port} first (KServe's agent "
                      f"loads models over REST on the container's port), got {c['ports'][0]} {spec['protocolVersions']}")
    if "storageUri" in isvc["spec"]["predictor"]["model"]:
        errors.append("multi-model InferenceService: predictor.model has a storageUri (TrainedModels bring the models)")
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    trained = [d for d in docs if d["kind"] == "TrainedModel"]
    if not trained:
        errors.append("multi-model runtime: expected at least one TrainedModel")
    for tm in trained:
        name = tm["metadata"]["name"]
        if tm["apiVersion"] != "serving.kserve.io/v1alpha1":
            errors.append(f"TrainedModel {name}: expected apiVersion serving.kserve.io/v1alpha1")
        errors += [f"TrainedModel {name} spec.{k}: unknown field" for k in set(tm["spec"]) - TRAINED_MODEL_SPEC_KEYS]
        model = tm["spec"].get("model", {})
        errors += [f"TrainedModel {name} spec.model.{k}: unknown field" for k in set(model) - TRAINED_MODEL_MODEL_KEYS]
        if tm["spec"].get("inferenceService") != isvc["metadata"]["name"]:
            errors.append(f"TrainedModel {name}: inferenceService {tm['spec'].get('inferenceService')!r} != "
                          f"{isvc['metadata']['name']!r}")
        if model.get("framework") not in formats:
            errors.append(f"TrainedModel {name}: framework {model.get('framework')!r} not among the runtime's {formats}")
        if not model.get("storageUri") or not model.get("memory"):
            errors.append(f"TrainedModel {name}: expected spec.model.storageUri and memory")
        try:
            check_name(name, f"TrainedModel {name}: metadata.name")
        except LayoutError as e:
            errors.append(str(e))
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rendered", type=Path, help="output of kubectl kustomize deploy/kserve")
    p.add_argument("--out", type=Path, required=True, help="directory for kserve-pod.yaml")
    args = p.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    errors = check(docs, args.out)
    for e in errors:
        print(f"{args.rendered}: {e}", file=sys.stderr)
    if not errors:
        print(f"{args.rendered}: KServe objects consistent; runtime pod -> {args.out / 'kserve-pod.yaml'}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
