"""Fail on any import cycle among the project's packages (run by `make lint`).

    python scripts/check_imports.py

Builds the import graph of training, serving, loadgen, benchmarks, deploy and scripts with grimp (imports
under `if TYPE_CHECKING:` excluded: they never run) and checks two levels: no cycle between packages
(training -> serving -> training), and no cycle between modules (serving.a -> serving.b -> serving.a).
A cycle is reported as the modules it runs through; exit status 1 if there is one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES: tuple[str, ...] = ("training", "serving", "loadgen", "benchmarks", "deploy", "scripts")

# Imports left out of the check, each with the reason and who removes it. Keep this empty.
ALLOWED: dict[tuple[str, str], str] = {}


def import_graph(packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports directly (at run time), minus ALLOWED."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    names = [p for p in packages if (REPO / p).is_dir()]
    graph = grimp.build_graph(*names, exclude_type_checking_imports=True, cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for importer, imported in ALLOWED:
        edges.get(importer, set()).discard(imported)
    return edges


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def package_edges(edges: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """The graph between top-level packages (an import inside one package is no edge)."""
    top = _top
    out: dict[str, set[str]] = {}
    for m, imported in edges.items():
        out.setdefault(top(m), set()).update(top(i) for i in imported if top(i) != top(m))
    return out


def main() -> int:
    edges = import_graph()
    problems = [("packages", c) for c in cycles(package_edges(edges))] + [("modules", c) for c in cycles(edges)]
    for level, component in problems:
        print(f"import cycle among {level}: {' <-> '.join(component)}", file=sys.stderr)
    if not problems:
        print(f"no import cycles among {len(edges)} modules of {', '.join(PACKAGES)} "
              f"({len(ALLOWED)} allowed import(s) left out: {', '.join(' -> '.join(k) for k in ALLOWED)})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
