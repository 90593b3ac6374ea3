"""Offline fallback for `kubectl kustomize DIR`: renders the subset of kustomize this repo uses.

    python deploy/k8s/render.py deploy/k8s/overlays/gpu > gpu.yaml

scripts/validate_deploy.sh prefers `kubectl kustomize` (kustomize v5 is built into kubectl and works
offline); this renderer exists so the manifests can still be rendered and validated on a machine
without kubectl, and tests/integration/test_deploy.py checks that both give the same objects.
Supported: `resources` (files and directories), `components` (kind Component: their resources,
generators and patches, applied to everything rendered so far, as kustomize does), `namespace`, `labels`
(pairs, includeSelectors, includeTemplates), `configMapGenerator` (envs/literals, behavior create|merge,
options.labels, a content-hash name suffix with references rewritten), `images` (newName/newTag) and
`patches` given as JSON 6902 operation lists with a target kind/name. Anything else is an error, never
silently ignored. The name suffix is a content hash like kustomize's but not byte-identical to it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
KNOWN_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "configMapGenerator",
              "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "APIService"}
TEMPLATED = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class RenderError(Exception):
    """The kustomization uses something this renderer does not support, or is malformed."""


def _env_pairs(base: Path, gen: Obj) -> dict[str, str]:
    data: dict[str, str] = {}
    for env in gen.get("envs", []):
        for n, line in enumerate((base / env).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise RenderError(f"{base / env}:{n}: expected KEY=VALUE, got {line!r}")
            k, v = line.split("=", 1)
            data[k] = v
    for lit in gen.get("literals", []):
        k, v = lit.split("=", 1)
        data[k] = v
    return data


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def apply_json6902(doc: Obj, ops: list[Obj]) -> None:
    """Apply add/replace/remove operations (RFC 6902) in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind = op["op"]
        if isinstance(node, list):
            idx = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[idx] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[idx]
            else:
                raise RenderError(f"unsupported JSON 6902 op {kind!r}")
        elif kind in ("add", "replace"):
            if kind == "replace" and last not in node:
                raise RenderError(f"replace: {op['path']} does not exist")
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[last]
        else:
            raise RenderError(f"unsupported JSON 6902 op {kind!r}")


def _matches(doc: Obj, target: Obj) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    want = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group, "version": version}
    return all(want.get(k) == v for k, v in target.items())


def _set_images(doc: Obj, images: list[Obj]) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {}) if doc["kind"] in TEMPLATED else {}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        name, _, tag = c["image"].partition(":")
        for img in images:
            if img["name"] == name:
                c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag or 'latest')}"


def _suffix(cm: Obj) -> str:
    blob = json.dumps({"kind": "ConfigMap", "name": cm["metadata"]["name"], "data": cm["data"]},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


def _rename_configmap_refs(doc: Obj, names: dict[str, str]) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {}) if doc["kind"] in TEMPLATED else {}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef")
            if ref and ref.get("name") in names:
                ref["name"] = names[ref["name"]]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref.get("name") in names:
                ref["name"] = names[ref["name"]]
    for v in spec.get("volumes", []):
        if "configMap" in v and v["configMap"].get("name") in names:
            v["configMap"]["name"] = names[v["configMap"]["name"]]


def _load(base: Path, kind: str) -> tuple[Path, Obj]:
    kfile = base / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise RenderError(f"{kfile}: unsupported fields {sorted(unknown)} (use kubectl kustomize)")
    if k.get("kind", "Kustomization") != kind:
        raise RenderError(f"{kfile}: kind {k.get('kind')!r} where a {kind} is expected")
    return kfile, k


def _build(base: Path) -> tuple[list[Obj], dict[str, Obj]]:
    """Objects (generated ConfigMaps still unhashed) and the generated ConfigMaps by name."""
    kfile, k = _load(base, "Kustomization")
    docs: list[Obj] = []
    generated: dict[str, Obj] = {}
    _transform(base, kfile, k, docs, generated)
    return docs, generated


def _transform(base: Path, kfile: Path, k: Obj, docs: list[Obj], generated: dict[str, Obj]) -> None:
    """Add `k`'s resources and components to `docs`, then apply its generators and transformers to all."""
    for res in k.get("resources", []):
        path = base / res
        if path.is_dir():
            sub_docs, sub_gen = _build(path)
            docs += sub_docs
            generated.update(sub_gen)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for comp in k.get("components", []):
        # A component sees (and patches) everything its parent has rendered so far.
        ckfile, ck = _load(base / comp, "Component")
        _transform(base / comp, ckfile, ck, docs, generated)
    for gen in k.get("configMapGenerator", []):
        name, behavior = gen["name"], gen.get("behavior", "create")
        data = _env_pairs(base, gen)
        labels = gen.get("options", {}).get("labels", {})
        if behavior == "create":
            if name in generated:
                raise RenderError(f"{kfile}: configMapGenerator {name} already exists (use behavior: merge)")
            cm: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
            if labels:
                cm["metadata"]["labels"] = dict(labels)
            generated[name] = cm
            docs.append(cm)
        elif behavior == "merge":
            if name not in generated:
                raise RenderError(f"{kfile}: configMapGenerator {name}: nothing to merge into")
            generated[name]["data"].update(data)
            generated[name]["metadata"].setdefault("labels", {}).update(labels)
        else:
            raise RenderError(f"{kfile}: configMapGenerator behavior {behavior!r} not supported")
    for patch in k.get("patches", []):
        if "target" not in patch or "path" not in patch:
            raise RenderError(f"{kfile}: only JSON 6902 patches with `path` and `target` are supported")
        ops = yaml.safe_load((base / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise RenderError(f"{base / patch['path']}: expected a JSON 6902 list of operations")
        hits = [d for d in docs if _matches(d, patch["target"])]
        if not hits:
            raise RenderError(f"{kfile}: patch target {patch['target']} matches nothing")
        for d in hits:
            apply_json6902(d, ops)
    for lab in k.get("labels", []):
        pairs = lab["pairs"]
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(pairs)
            if d["kind"] in TEMPLATED and (lab.get("includeTemplates") or lab.get("includeSelectors")):
                d["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            if lab.get("includeSelectors"):
                raise RenderError(f"{kfile}: labels.includeSelectors is not supported")
    if "images" in k:
        for d in docs:
            _set_images(d, k["images"])
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]


def render(base: Path) -> list[Obj]:
    """Render the kustomization in `base` to a list of objects."""
    docs, generated = _build(base)
    names = {}
    for name, cm in generated.items():
        names[name] = f"{name}-{_suffix(cm)}"
        cm["metadata"]["name"] = names[name]
    for d in docs:
        _rename_configmap_refs(d, names)
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="directory holding kustomization.yaml")
    args = p.parse_args(argv)
    try:
        docs = render(args.dir)
    except (RenderError, OSError, KeyError, yaml.YAMLError) as e:
        sys.stderr.write(f"render.py: {args.dir}: {e}\n")
        return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
