"""The floor plan holds: no import cycles inside poisonlab, and no import runs up the layer order.

The graph is read from the source with `ast` (every import statement, also those inside
functions), so it sees what `python -c "import poisonlab..."` would and more.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "poisonlab"

# Bottom to top: a module may import from its own layer and the layers below it.
LAYERS: list[set[str]] = [
    {"", "errors", "device", "progress", "config", "yaml_tree"},
    {"executors"},
    {"data", "models"},
    {"metrics"},
    {"runs"},
    {"training"},
    {"attacks", "defenses"},
    {"evaluation"},
    {"report"},
    {"audit", "experiments"},
    {"sweeps"},
    {"cli"},
    {"launch", "__main__"},  # the console script: a SIGTERM handler, then the CLI's import
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = ["poisonlab", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    return imports_of(path.read_text(encoding="utf-8"), module_name(path),
                      path.name == "__init__.py", modules)


def imports_of(source: str, me: str, is_package: bool, modules) -> set[str]:
    """The poisonlab modules that the source of module `me` imports, anywhere in it (a
    `from pkg import name` of a submodule counts as that submodule)."""
    package = me if is_package else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "poisonlab"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "poisonlab":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != me}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported(path, modules) for name, path in modules.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer():
    unknown = sorted({layer(m) for m in all_modules()} - set(RANK))
    assert not unknown, f"packages without a layer in LAYERS: {unknown}"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_import_runs_up_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                    if RANK[layer(b)] > RANK[layer(a)])
    assert upward == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected


def test_the_graph_sees_function_local_and_relative_imports():
    modules = {"poisonlab.a.x", "poisonlab.a.y", "poisonlab.b", "poisonlab.a"}
    source = ("import torch\n"
              "def f():\n    from poisonlab import b\n    from . import y\n"
              "    from ..b import thing\n")
    assert imports_of(source, "poisonlab.a.x", False, modules) == {"poisonlab.b", "poisonlab.a.y"}
