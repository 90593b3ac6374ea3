"""deploy/k8s/training: valid against the Kubernetes 1.31 schemas (offline) and consistent with itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

MANIFESTS = REPO / "deploy" / "k8s" / "training"
RESOURCE_FILES = ("pvc.yaml", "service.yaml", "job.yaml")
K8S_VERSION = "1.31.0"


def kubernetes_validate() -> list[str]:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if not exe.exists():
        pytest.skip("kubernetes-validate is not installed (pip install '.[dev]')")
    return [str(exe), "--strict", "-k", K8S_VERSION]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((MANIFESTS / name).read_text())


def test_each_manifest_is_valid_for_kubernetes_1_31_in_strict_mode() -> None:
    done = subprocess.run([*kubernetes_validate(), *(str(MANIFESTS / f) for f in RESOURCE_FILES)],
                          text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_kustomization_renders_and_the_rendered_output_is_valid(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomization offline")
    rendered = subprocess.run([kubectl, "kustomize", str(MANIFESTS)], text=True, capture_output=True, timeout=60, check=False)
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    done = subprocess.run([*kubernetes_validate(), str(out)], text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered.stdout))
    assert kinds == ["Job", "PersistentVolumeClaim", "Service"]


def test_the_job_the_service_and_the_volume_fit_together() -> None:
    job, svc, pvc = load("job.yaml"), load("service.yaml"), load("pvc.yaml")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    args = pod["containers"][0]["args"]
    flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(flag["--nnodes"])
    # rendezvous: pods resolve as <job>-<i>.<service>; rank 0's store listens on the Service's port
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert flag["--master-addr"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(flag["--master-port"]) == svc["spec"]["ports"][0]["port"]
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert flag["--node-rank"] == "$(NODE_RANK)"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    # the run directory lives on the shared RWX volume, and re-submission resumes
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim["name"])
    assert flag["--out"].startswith(mount["mountPath"] + "/") and "--resume" in args


def test_the_jobs_training_flags_are_accepted_by_training_fit() -> None:
    args = load("job.yaml")["spec"]["template"]["spec"]["containers"][0]["args"]
    fit_args = args[args.index("training.fit") + 1:]
    from training.fit import build_parser

    build_parser().parse_args(fit_args)  # argparse exits (SystemExit) on an unknown or malformed flag
