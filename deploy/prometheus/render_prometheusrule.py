"""Generate deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/rules.yml.

    python deploy/prometheus/render_prometheusrule.py           # rewrite the PrometheusRule
    python deploy/prometheus/render_prometheusrule.py --check   # exit 1 if it is stale (CI)

rules.yml is the source of truth: promtool checks and unit-tests it as a plain rule file, and the
Prometheus Operator's PrometheusRule carries the same `groups` under `spec`. The rule file is embedded
as text (indented under `spec:`), so comments and block scalars survive. Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1]
RULES = DEPLOY / "prometheus" / "rules.yml"
TARGET = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/prometheus/render_prometheusrule.py: do not edit.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: vae-serve
  labels:
    app.kubernetes.io/name: vae-serve
    app.kubernetes.io/component: server
    # kube-prometheus-stack's Prometheus selects rules by its release label by default.
    release: kube-prometheus-stack
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule manifest whose `spec` is the rule file from its `groups:` line on."""
    lines = rules_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    except StopIteration:
        raise ValueError(f"{RULES}: no top-level 'groups:' key") from None
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the committed file is up to date")
    args = p.parse_args(argv)
    want = render(RULES.read_text())
    if args.check:
        have = TARGET.read_text() if TARGET.exists() else ""
        if have != want:
            sys.stderr.write(f"{TARGET} is stale: run python {Path(__file__).relative_to(DEPLOY.parent)}\n")
            return 1
        return 0
    TARGET.write_text(want)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
