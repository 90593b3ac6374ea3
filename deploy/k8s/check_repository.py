"""Check the poll-mode model repository example's wiring offline (scripts/validate_deploy.sh repository).

    python deploy/k8s/check_repository.py RENDERED.yaml

RENDERED is `kubectl kustomize deploy/k8s/examples/repository-poll` (or deploy/k8s/render.py). Exits 1
listing every failure:
  - the server's ConfigMap is a valid ServeConfig (serving.config, the server's own validation) in
    poll mode with a --model-repository;
  - the server mounts, read-only, a PersistentVolumeClaim at exactly that path;
  - the CronJob's export container publishes (`training.export --repository DIR --name N`) into the same
    claim mounted at DIR, N is a valid model name (serving.layout), and its --run is where the fit
    container wrote, on a volume both mount;
  - the claim is ReadWriteMany (server pods and the CronJob's pod mount it at once, on any node).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from serving.config import ConfigError, ServeConfig
from serving.layout import LayoutError, check_name

Obj = dict[str, Any]


def _args(container: Obj) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container.get("args", []) if "=" in a)


def _mounts(pod: Obj, container: Obj) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim name or volume name, read-only) for each of the container's mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        claim = v.get("persistentVolumeClaim", {}).get("claimName", "volume:" + m["name"])
        out[m["mountPath"]] = (claim, bool(m.get("readOnly")))
    return out


def check(docs: list[Obj]) -> list[str]:
    errors: list[str] = []
    by_kind: dict[str, list[Obj]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (cm,) = [c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"].startswith("vae-serve-config")]
    try:
        config = ServeConfig.from_args([], env=cm["data"])
    except (ConfigError, SystemExit) as e:
        return [f"ConfigMap {cm['metadata']['name']}: not a valid server configuration ({e})"]
    if config.model_repository is None or config.model_control != "poll":
        errors.append(f"ConfigMap: expected --model-control poll with a --model-repository, got "
                      f"{config.model_control!r} and {config.model_repository}")
        return errors
    repo = str(config.model_repository)
    (dep,) = by_kind["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "server")
    claim, read_only = _mounts(pod, server).get(repo, ("", False))
    if claim.startswith("volume:") or not claim:
        errors.append(f"server container: expected a PersistentVolumeClaim mounted at {repo}, got {claim or 'nothing'}")
    elif not read_only:
        errors.append(f"server container: {repo} must be mounted readOnly (the server only reads the repository)")
    (cron,) = by_kind.get("CronJob", [{}])
    job_pod = cron.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    containers = job_pod.get("initContainers", []) + job_pod.get("containers", [])
    export = [c for c in containers if c.get("command", [])[-1:] == ["training.export"]]
    fit = [c for c in containers if c.get("command", [])[-1:] == ["training.fit"]]
    if len(export) != 1 or len(fit) != 1:
        return errors + ["CronJob: expected one training.fit and one training.export container"]
    ea, fa = _args(export[0]), _args(fit[0])
    target = ea.get("repository", "")
    if _mounts(job_pod, export[0]).get(target, ("", True)) != (claim, False):
        errors.append(f"CronJob export: --repository {target!r} must be claim {claim} mounted writable")
    try:
        check_name(ea.get("name", ""), "CronJob export --name")
    except LayoutError as e:
        errors.append(str(e))
    run, out = ea.get("run", ""), fa.get("out", "")
    shared = [p for p in _mounts(job_pod, fit[0]) if out.startswith(p + "/")]
    if run != out or not shared or shared[0] not in _mounts(job_pod, export[0]):
        errors.append(f"CronJob: export --run {run!r} must be fit --out {out!r} on a volume both mount")
    pvcs = {p["metadata"]["name"]: p for p in by_kind.get("PersistentVolumeClaim", [])}
    if claim in pvcs and "ReadWriteMany" not in pvcs[claim]["spec"]["accessModes"]:
        errors.append(f"PersistentVolumeClaim {claim}: expected ReadWriteMany (server pods and the CronJob mount it)")
    elif claim not in pvcs:
        errors.append(f"PersistentVolumeClaim {claim}: not rendered")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rendered", type=Path, help="output of kubectl kustomize deploy/k8s/examples/repository-poll")
    args = p.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    errors = check(docs)
    for e in errors:
        print(f"{args.rendered}: {e}", file=sys.stderr)
    if not errors:
        print(f"{args.rendered}: model repository wiring consistent (poll mode, one claim, CronJob publishes into it)")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
