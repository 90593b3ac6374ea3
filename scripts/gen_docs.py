"""Regenerate the generated sections of docs/ARCHITECTURE.md from the code they describe.

    python scripts/gen_docs.py           # rewrite the sections in place
    python scripts/gen_docs.py --check   # exit 1, with a diff, if the committed docs differ

A generated section sits between `<!-- BEGIN GENERATED <name> ... -->` and `<!-- END GENERATED <name> -->`;
everything outside the markers is hand-written. Sections:

    serving-flags   the flags of `python -m serving`, from serving.config's one parser and ServeConfig
    metrics         the Prometheus families of the server, from serving.metrics.Metrics

tests/unit/test_docs.py fails when the committed docs differ from what this writes.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from serving.config import ENV_PREFIX, ServeConfig, build_parser
from serving.metrics import REJECTION_REASONS, Metrics

ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
MIB = 1024 * 1024

# What each label's values are (the label names themselves come from serving.metrics).
LABEL_VALUES: dict[str, str] = {
    "method": "the RPC name; `http/<name>` on the HTTP port",
    "code": "gRPC status name, e.g. OK, INVALID_ARGUMENT",
    "model": ", ".join(Metrics().models) + "; with --model-repository `<vae>.<graph>`",
    "version": "the model version; on the per-model and Score series only with --model-repository (a "
               "--model-dir server's have no `version` label); vae_model_info: the version number, with "
               "--model-dir the manifest's",
    "name": "the VAE (the repository's model name; with --model-dir the manifest's)",
    "reason": ", ".join(REJECTION_REASONS),
}


def _default(field: str, value: object) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if field.endswith("_bytes") and isinstance(value, int) and value % MIB == 0:
        return f"{value} ({value // MIB} MiB)"
    return str(value)


def flags_table() -> str:
    """flag | environment variable | default | what it does, one row per flag of `python -m serving`."""
    defaults = ServeConfig()
    rows = ["| flag | environment variable | default | what it does |", "| --- | --- | --- | --- |"]
    for action in build_parser({})._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        old = f" (formerly `{action.option_strings[1]}`)" if len(action.option_strings) > 1 else ""
        help_ = (action.help or "").replace("|", "\\|")
        help_ = re.sub(r" \(formerly --[a-z-]+, still accepted\)$", "", help_)
        if action.choices:
            help_ += " (" + " \\| ".join(str(c) for c in action.choices) + ")"
        default = _default(action.dest, getattr(defaults, action.dest))
        rows.append(f"| `{flag}`{old} | `{ENV_PREFIX}{action.dest.upper()}` | {f'`{default}`' if default else ''} | "
                    f"{help_} |")
    return "\n".join(rows)


def metrics_table() -> str:
    """name | type | labels | help, one row per family a server registers (namespace `vae`)."""
    m = Metrics(versioned=True)  # every label a family can have (the repository's server)
    rows = ["| name | type | labels | help |", "| --- | --- | --- | --- |"]
    for collector in m.registry._collector_to_names:
        kind = getattr(collector, "_type", None)
        if kind is None:  # not a metric family (the tallies' flush, run before each collection)
            continue
        name = collector._name + ("_total" if kind == "counter" else "")  # type: ignore[attr-defined]
        labels = ", ".join(f"`{n}` ({LABEL_VALUES[n]})" if n in LABEL_VALUES else f"`{n}`"
                           for n in collector._labelnames)  # type: ignore[attr-defined]
        rows.append(f"| `{name}` | {kind} | {labels} | {collector._documentation} |")  # type: ignore[attr-defined]
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {"serving-flags": flags_table, "metrics": metrics_table}


def render(text: str) -> str:
    """`text` with every generated section replaced by what the code says now."""
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN GENERATED {name}\b[^\n]*-->\n)(.*?)(<!-- END GENERATED {name} -->)",
                             re.DOTALL)
        found = pattern.search(text)
        if found is None:
            raise SystemExit(f"{ARCHITECTURE}: no generated section {name!r} (markers missing)")
        text = text[:found.start(2)] + make() + "\n" + text[found.end(2):]
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 with a diff if the docs differ")
    args = p.parse_args(argv)
    current = ARCHITECTURE.read_text()
    wanted = render(current)
    if wanted == current:
        return 0
    if args.check:
        sys.stderr.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True),
                                                   str(ARCHITECTURE), "generated"))
        sys.stderr.write("docs/ARCHITECTURE.md is out of date: run python scripts/gen_docs.py\n")
        return 1
    ARCHITECTURE.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
