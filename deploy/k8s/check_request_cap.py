"""Check the request-size cap at the proxy (components/request-size-cap) in a rendered overlay.

    python deploy/k8s/check_request_cap.py RENDERED.yaml

Both gRPC front ends read a whole message into memory before the server can refuse it, so a cap at the
proxy in front is what bounds a pod's memory per request (deploy/README.md, "Request size: what bounds
memory"). kubernetes-validate checks the Ingress's fields but not its annotations or where it routes, so
this script checks by hand, and exits 1 listing every failure:
  - every Ingress routing to the server carries nginx.ingress.kubernetes.io/proxy-body-size equal to the
    overlay's --max-message-bytes (ServeConfig built from the rendered ConfigMap, so a default changed in
    serving/config.py or an override in server.env both count) plus ALLOWANCE_BYTES;
  - its backends are named ports of a Service in the overlay; the gRPC one says backend-protocol GRPC and
    has TLS (ingress-nginx serves HTTP/2, which gRPC needs, only over TLS); both ports are routed;
  - the NetworkPolicy lets the gRPC and HTTP ports be reached only from the proxy's namespace (plus the
    monitoring namespace on the http port), so no client can go around the cap.
An overlay without an Ingress has no cap to check and passes (the component is optional).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from serving.config import ServeConfig

Obj = dict[str, Any]
# Above --max-message-bytes so that the server, not the proxy, refuses the requests just over it (with its
# message naming the limit), and so a message of exactly the limit passes with its 5-byte gRPC prefix.
ALLOWANCE_BYTES = 64 * 1024
BODY_SIZE = "nginx.ingress.kubernetes.io/proxy-body-size"
BACKEND_PROTOCOL = "nginx.ingress.kubernetes.io/backend-protocol"
PROXY_NAMESPACE = "ingress-nginx"
MONITORING_NAMESPACE = "monitoring"
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def nginx_size(value: str) -> int:
    """Bytes in an nginx size ("16842752", "16448k", "16m"), as client_max_body_size reads it."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value.strip())
    if not m:
        raise ValueError(f"{value!r} is not an nginx size (digits with an optional k, m or g)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def cap_bytes(env: dict[str, str]) -> int:
    """The cap the proxy must apply for a server started with this VAE_SERVE_* environment."""
    return ServeConfig.from_args([], env=env).max_message_bytes + ALLOWANCE_BYTES


def _namespaces(rule: Obj) -> set[str | None]:
    """The namespace names a NetworkPolicy ingress rule admits; None stands for 'any' (or not by name)."""
    out: set[str | None] = set()
    for peer in rule.get("from", [{}]):  # no `from` admits everyone
        sel = peer.get("namespaceSelector")
        name = (sel or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
        out.add(name if sel is not None and set(sel) == {"matchLabels"} and len(sel["matchLabels"]) == 1 else None)
    return out


def server_env(docs: list[Obj]) -> dict[str, str]:
    """The VAE_SERVE_* settings the overlay's ConfigMap gives the server."""
    return {k: v for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vae-serve-config")
            for k, v in d.get("data", {}).items()}


def check(docs: list[Obj]) -> list[str]:
    """All failures in one rendered overlay (empty when its cap is consistent, or it has no Ingress)."""
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    if not ingresses:
        return []
    errors: list[str] = []
    want = cap_bytes(server_env(docs))
    services = {s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]} for s in docs if s["kind"] == "Service"}
    routed: set[str] = set()
    for ing in ingresses:
        name, notes = ing["metadata"]["name"], ing["metadata"].get("annotations", {})
        try:
            got = nginx_size(notes[BODY_SIZE])
            if got != want:
                errors.append(f"Ingress {name}: {BODY_SIZE} {got} != --max-message-bytes + {ALLOWANCE_BYTES} = {want}")
        except KeyError:
            errors.append(f"Ingress {name}: no {BODY_SIZE} (ingress-nginx's default is 1m, not the server's limit)")
        except ValueError as e:
            errors.append(f"Ingress {name}: {BODY_SIZE}: {e}")
        ports = set()
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                svc = path["backend"]["service"]
                port = svc["port"].get("name")
                if port not in services.get(svc["name"], set()):
                    errors.append(f"Ingress {name}: backend {svc['name']}:{port} is not a named port of a Service "
                                  f"in the overlay")
                ports.add(port)
        routed |= ports
        grpc = notes.get(BACKEND_PROTOCOL, "HTTP").upper() in ("GRPC", "GRPCS")
        if ("grpc" in ports) != grpc or len(ports) != 1:
            errors.append(f"Ingress {name}: routes to ports {sorted(ports)} with {BACKEND_PROTOCOL} "
                          f"{notes.get(BACKEND_PROTOCOL, 'HTTP (default)')}; want one port, GRPC exactly for grpc")
        if grpc and not ing["spec"].get("tls"):
            errors.append(f"Ingress {name}: gRPC needs HTTP/2, which ingress-nginx serves only over TLS: add spec.tls")
    for port in ("grpc", "http"):
        if port not in routed:
            errors.append(f"overlay: no Ingress routes the {port} port, so its requests are not capped")

    allowed = {"grpc": {PROXY_NAMESPACE}, "http": {PROXY_NAMESPACE, MONITORING_NAMESPACE}}
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                extra = _namespaces(rule) - allowed.get(p["port"], set())
                if extra:
                    errors.append(f"NetworkPolicy {np['metadata']['name']}: port {p['port']} is open to namespaces "
                                  f"{sorted(map(str, extra))} (None: any), which can go around the cap; allow "
                                  f"{sorted(allowed.get(p['port'], set()))} only")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rendered", type=Path, help="output of kubectl kustomize for one overlay")
    args = p.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    errors = check(docs)
    for e in errors:
        sys.stderr.write(f"{args.rendered}: {e}\n")
    n = sum(d["kind"] == "Ingress" for d in docs)
    if not errors:
        sys.stdout.write(f"{args.rendered}: " + (f"request-size cap consistent ({n} Ingresses, "
                                                 f"{cap_bytes(server_env(docs))} bytes)\n" if n else "no request-size cap (no Ingress)\n"))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
