"""Print the serving image's pip requirements, read from pyproject.toml's `serve` extra.

    python deploy/serve_requirements.py --variant cpu [--onnxruntime-version 1.31.1] > requirements.txt

The `serve` extra is the one list of serving dependencies; the Dockerfile calls this script so the
image cannot drift from it. The only change per variant is the ONNX Runtime wheel: `onnxruntime`
(CPU) or `onnxruntime-gpu` (CUDA), pinned to the version the image's CUDA base was chosen for.
Standard library only: it runs in a bare `python:3.11-slim` build stage.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

ORT_PACKAGES = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
FORBIDDEN = {"torch", "torchvision", "onnx", "onnxscript"}  # training-only; the image must not carry them


def serve_requirements(pyproject: Path, variant: str, onnxruntime_version: str | None) -> list[str]:
    """The `serve` extra with ONNX Runtime swapped for `variant` (and pinned when a version is given)."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    out: list[str] = []
    for req in extras["serve"]:
        m = _NAME.match(req)
        if m is None:
            raise ValueError(f"serve extra: cannot parse requirement {req!r}")
        name = m.group(1).lower().replace("_", "-")
        if name in FORBIDDEN:
            raise ValueError(f"serve extra: {name} is a training dependency and must not be in the image")
        if name in ORT_PACKAGES.values():
            pin = f"=={onnxruntime_version}" if onnxruntime_version else req[m.end():].strip()
            req = f"{ORT_PACKAGES[variant]}{pin}"
        out.append(req)
    if not any(r.startswith(ORT_PACKAGES[variant]) for r in out):
        raise ValueError("serve extra: no onnxruntime requirement found")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", choices=sorted(ORT_PACKAGES), required=True, help="image variant")
    p.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml",
                   help="pyproject.toml to read the serve extra from")
    p.add_argument("--onnxruntime-version", default="", help="exact ONNX Runtime version ('' = keep range)")
    args = p.parse_args(argv)
    for req in serve_requirements(args.pyproject, args.variant, args.onnxruntime_version or None):
        sys.stdout.write(req + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
