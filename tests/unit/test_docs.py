"""The docs agree with the code: generated sections are current, documented defaults are ServeConfig's,
and the architecture map names every module and script."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from scripts.gen_docs import ARCHITECTURE, render
from serving.config import RENAMED_FLAGS, ServeConfig
from tests.conftest import REPO

README = REPO / "README.md"
MIB = 1024 * 1024
FIELDS = {f.name: f for f in fields(ServeConfig)}
DEFAULTS = ServeConfig()


def _field(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _value(number: str, unit: str) -> float:
    return float(number) * (MIB if unit == "MiB" else 1)


def test_the_generated_sections_of_the_architecture_doc_are_current() -> None:
    text = ARCHITECTURE.read_text()
    assert render(text) == text, "docs/ARCHITECTURE.md is out of date: run python scripts/gen_docs.py"


def test_the_architecture_flag_table_shows_every_flag_with_its_serveconfig_default() -> None:
    text = ARCHITECTURE.read_text()
    rows = dict(re.findall(r"^\| `(--[a-z-]+)`[^|]*\| `VAE_SERVE_[A-Z_]+` \| ([^|]*) \|", text, re.MULTILINE))
    assert {_field(f) for f in rows} == set(FIELDS)
    for flag, cell in rows.items():
        default = getattr(DEFAULTS, _field(flag))
        shown = cell.strip().strip("`").split(" ")[0]
        if default is None or default == "":
            assert shown == "", flag
        elif isinstance(default, bool):
            assert shown == str(default).lower(), flag
        elif isinstance(default, (int, float)):
            assert float(shown) == default, flag
        else:
            assert shown == str(default), flag


def test_the_readmes_documented_serving_defaults_are_serveconfigs() -> None:
    # "`--max-message-bytes` (16 MiB)", "`--drain-delay-s` (2 s)", "`--http-port` (8080)"
    found = re.findall(r"`(--[a-z-]+)` \((\d+(?:\.\d+)?)(?: (MiB|s)\b)?", README.read_text())
    checked = []
    for flag, number, unit in found:
        if flag in RENAMED_FLAGS:  # "`--metrics-port` (9090)": the old flag's old default, as history
            continue
        assert _field(flag) in FIELDS, f"README documents {flag}, which python -m serving does not have"
        assert _value(number, unit) == getattr(DEFAULTS, _field(flag)), f"README: {flag} ({number} {unit})"
        checked.append(flag)
    assert len(checked) >= 8, checked  # the pattern still finds the README's defaults


def test_the_readme_puts_metrics_on_the_http_port() -> None:
    table_row = next(line for line in README.read_text().splitlines() if line.startswith("| serving |"))
    ports = re.findall(r"`:(\d+)/metrics`", table_row)
    assert ports == [str(DEFAULTS.http_port)]


def _map_block() -> str:
    text = ARCHITECTURE.read_text()
    return text[text.index("```\n") + 4:text.index("\n```", text.index("```\n") + 4)]


@pytest.mark.parametrize("package", ["training", "serving", "loadgen", "scripts"])
def test_the_architecture_map_names_every_module_and_script(package: str) -> None:
    block = _map_block()
    files = sorted(p.name for p in (REPO / package).iterdir()
                   if p.is_file() and p.suffix in (".py", ".sh") and p.name != "__init__.py")
    assert files
    missing = [name for name in files if not re.search(rf"(?<![\w.]){re.escape(name)}\b", block)]
    assert not missing, f"docs/ARCHITECTURE.md's map lacks {package}/{missing}"


def test_the_architecture_map_has_an_entry_for_every_top_level_directory() -> None:
    block = _map_block()
    tops = sorted(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                  and any(p.iterdir()) and p.name not in ("docs", "build", "runs", "exported")
                  and not p.name.endswith(".egg-info"))
    missing = [t for t in tops if not re.search(rf"^{t}/", block, re.MULTILINE)]
    assert not missing, f"docs/ARCHITECTURE.md's map lacks {missing}"


def test_ci_runs_make_lint_as_the_readme_says() -> None:
    assert "make lint" in (REPO / ".ci" / "run").read_text() and "`make lint`" in README.read_text()
