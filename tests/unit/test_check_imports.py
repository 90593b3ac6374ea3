"""scripts/check_imports.py, the import-cycle check of `make lint`, on small graphs."""

from __future__ import annotations

from scripts.check_imports import ALLOWED, cycles, package_edges


def test_a_cycle_between_modules_is_found_with_every_module_on_it() -> None:
    edges = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}, "q.x": set()}
    assert cycles(edges) == [["p.a", "p.b", "p.c"]]


def test_a_graph_without_cycles_has_none() -> None:
    assert cycles({"p.a": {"p.b", "q.x"}, "p.b": {"q.x"}, "q.x": set()}) == []


def test_a_cycle_between_packages_is_found_even_when_no_module_cycle_exists() -> None:
    edges = {"p.a": {"q.x"}, "q.y": {"p.b"}, "p.b": set(), "q.x": set()}
    assert cycles(edges) == []
    assert cycles(package_edges(edges)) == [["p", "q"]]


def test_the_allow_list_holds_at_most_the_known_serving_pair() -> None:
    assert set(ALLOWED) <= {("serving.metrics", "serving.workers")}  # the serving rewrite empties it
