"""Validate what kubernetes-validate cannot: the CRDs and the wiring between objects of a rendered overlay.

    python deploy/k8s/check_monitoring.py RENDERED.yaml --out DIR

kubernetes-validate ships schemas for built-in kinds only, so for the Prometheus Operator's CRDs and
the cross-object references this script checks, and exits 1 listing every failure:
  - PrometheusRule: its `spec` equals deploy/prometheus/rules.yml exactly; written to DIR/<ns>-rules.yml
    for `promtool check rules`.
  - ServiceMonitor: known fields only; selects exactly one Service (not the headless one, or pods
    would be scraped twice); its endpoint ports are named ports of that Service.
  - Services, probes, NetworkPolicy: named target ports exist on the Deployment's container; the
    selectors match the pod template's labels; probes use gRPC on the `grpc` port.
  - HPA: every Pods metric is served by a rule in deploy/prometheus/prometheus-adapter.yaml; each
    adapter metricsQuery, with its <<.Series>>/<<.LabelMatchers>>/<<.GroupBy>> templates filled in,
    is written to DIR/adapter-queries.yml as a recording rule, so `promtool check rules` parses it.
  - terminationGracePeriodSeconds exceeds preStop + VAE_SERVE_DRAIN_DELAY_S + VAE_SERVE_GRACE_PERIOD_S.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
RULES = DEPLOY / "prometheus" / "rules.yml"
ADAPTER = DEPLOY / "prometheus" / "prometheus-adapter.yaml"
Obj = dict[str, Any]

SERVICEMONITOR_SPEC_KEYS = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                            "podTargetLabels", "sampleLimit", "targetLimit", "attachMetadata"}
ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                 "honorTimestamps", "relabelings", "metricRelabelings", "tlsConfig", "params",
                 "followRedirects", "enableHttp2", "bearerTokenSecret", "authorization", "basicAuth"}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check(docs: list[Obj], out: Path) -> list[str]:
    """All failures found in one rendered overlay (empty when it is consistent); writes promtool inputs."""
    errors: list[str] = []
    by_kind: dict[str, list[Obj]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    (dep,) = by_kind["Deployment"]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if not _selects(dep["spec"]["selector"]["matchLabels"], pod_labels):
        errors.append("Deployment: selector does not match its pod template labels")

    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(name, {})
        if probe.get("grpc", {}).get("port") != ports.get("grpc"):
            errors.append(f"Deployment: {name} is not a gRPC probe on the grpc port {ports.get('grpc')}")

    cm_names = [ef["configMapRef"]["name"] for ef in container.get("envFrom", []) if "configMapRef" in ef]
    cms = [c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] in cm_names]
    env = {k: v for c in cms for k, v in c.get("data", {}).items()}
    if not cms:
        errors.append(f"Deployment: envFrom ConfigMap {cm_names} is not in the overlay")
    grace = float(env.get("VAE_SERVE_GRACE_PERIOD_S", 10))
    drain = float(env.get("VAE_SERVE_DRAIN_DELAY_S", 0))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if not tgps > pre_stop + drain + grace:
        errors.append(f"Deployment: terminationGracePeriodSeconds {tgps} <= preStop {pre_stop} + drain delay "
                      f"{drain} + grace {grace}")
    if str(env.get("VAE_SERVE_PORT")) != str(ports.get("grpc")):
        errors.append(f"ConfigMap: VAE_SERVE_PORT {env.get('VAE_SERVE_PORT')} != grpc port {ports.get('grpc')}")
    if str(env.get("VAE_SERVE_HTTP_PORT", 8080)) != str(ports.get("http")):
        errors.append(f"ConfigMap: VAE_SERVE_HTTP_PORT != the container's http port {ports.get('http')}")

    services = by_kind.get("Service", [])
    for svc in services:
        if not _selects(svc["spec"]["selector"], pod_labels):
            errors.append(f"Service {svc['metadata']['name']}: selector does not match the pods")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports:
                errors.append(f"Service {svc['metadata']['name']}: targetPort {p.get('targetPort')} is not a "
                              f"container port name {sorted(ports)}")

    for np in by_kind.get("NetworkPolicy", []):
        if not _selects(np["spec"]["podSelector"]["matchLabels"], pod_labels):
            errors.append("NetworkPolicy: podSelector does not match the pods")
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if p["port"] not in ports:
                    errors.append(f"NetworkPolicy: ingress port {p['port']} is not a container port name")

    for sm in by_kind.get("ServiceMonitor", []):
        if sm["apiVersion"] != "monitoring.coreos.com/v1":
            errors.append(f"ServiceMonitor: apiVersion {sm['apiVersion']}")
        extra = set(sm["spec"]) - SERVICEMONITOR_SPEC_KEYS
        if extra:
            errors.append(f"ServiceMonitor: unknown spec fields {sorted(extra)}")
        selected = [s for s in services if _selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
                    and s["metadata"].get("namespace") == sm["metadata"].get("namespace")]
        if len(selected) != 1:
            errors.append(f"ServiceMonitor: selects {len(selected)} Services, want exactly 1")
            continue
        if selected[0]["spec"].get("clusterIP") == "None":
            errors.append("ServiceMonitor: selects the headless Service")
        svc_ports = {p["name"] for p in selected[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if set(ep) - ENDPOINT_KEYS:
                errors.append(f"ServiceMonitor: unknown endpoint fields {sorted(set(ep) - ENDPOINT_KEYS)}")
            if ep.get("port") not in svc_ports:
                errors.append(f"ServiceMonitor: endpoint port {ep.get('port')} not in Service ports {svc_ports}")

    want_rules = yaml.safe_load(RULES.read_text())
    for pr in by_kind.get("PrometheusRule", []):
        if pr["spec"] != want_rules:
            errors.append("PrometheusRule: spec differs from deploy/prometheus/rules.yml "
                          "(run python deploy/prometheus/render_prometheusrule.py)")
        ns = pr["metadata"].get("namespace", "default")
        (out / f"{ns}-prometheusrule-spec.yml").write_text(yaml.safe_dump(pr["spec"], sort_keys=False))
    if not by_kind.get("PrometheusRule") or not by_kind.get("ServiceMonitor"):
        errors.append("overlay: expected a PrometheusRule and a ServiceMonitor")

    adapter = yaml.safe_load(ADAPTER.read_text())["rules"]
    served = {r["name"]["as"] for r in adapter}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in served:
                errors.append(f"HPA: Pods metric {m['pods']['metric']['name']} is not served by the adapter "
                              f"rules {sorted(served)}")
    queries = []
    for r in adapter:
        series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)  # type: ignore[union-attr]
        q = (r["metricsQuery"].replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", 'namespace="vae-serve",pod=~"vae-serve-.*"')
             .replace("<<.GroupBy>>", "pod"))
        queries.append({"record": f"adapter:{r['name']['as']}", "expr": q})
    (out / "adapter-queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "prometheus-adapter", "rules": queries}]}, sort_keys=False))
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rendered", type=Path, help="output of kubectl kustomize for one overlay")
    p.add_argument("--out", type=Path, required=True, help="directory for the files promtool checks")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    errors = check(docs, args.out)
    for e in errors:
        sys.stderr.write(f"{args.rendered}: {e}\n")
    if not errors:
        sys.stdout.write(f"{args.rendered}: {len(docs)} objects consistent (CRDs, ports, selectors, adapter)\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
