"""Imports inside sa_shardkit go one way: no module imports one that (directly or not) imports it.

Every import counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (annotations only, never run). Importing ``pkg.mod`` also runs ``pkg``'s
``__init__`` (for a package the importer is not itself inside), so that edge counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sa_shardkit

ROOT = Path(sa_shardkit.__file__).parent
PACKAGE = "sa_shardkit"


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """Every sa_shardkit module ``module``'s code imports when it runs (any nesting level)."""
    names: set[str] = set()
    base = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                target = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                target = node.module or ""
            names.add(target)
            for alias in node.names:  # from package import submodule
                if f"{target}.{alias.name}" in modules:
                    names.add(f"{target}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # a package the importer is inside is already running its __init__ (``from . import log``)
    inside = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
    return {n for n in names if n in modules and n != module and n not in inside}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for target in _imported(tree, module, path.name == "__init__.py", modules):
            edges.add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):  # parent packages run first (the root's is excluded)
                parent = ".".join(parts[:i])
                if not (module == parent or module.startswith(parent + ".")):
                    edges.add(parent)
        graph[module] = edges - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _path(graph: dict[str, set[str]], cycle: list[str]) -> str:
    """One concrete loop through the component, for the failure message."""
    members = set(cycle)
    start = cycle[0]
    seen = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for succ in sorted(graph[node] & members):
            if succ == start:
                return " -> ".join([*seen[node], start])
            if succ not in seen:
                seen[succ] = [*seen[node], succ]
                frontier.append(succ)
    return ", ".join(cycle)


def test_no_import_cycle_in_sa_shardkit() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_path(graph, c) for c in cycles)


def test_the_walker_sees_function_level_imports_and_skips_type_checking_ones() -> None:
    modules = {"sa_shardkit.a": Path("a.py"), "sa_shardkit.b": Path("b.py"), "sa_shardkit.c": Path("c.py")}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .c import C\n"
        "def f():\n    from .b import g\n    return g\n"
    )
    assert _imported(ast.parse(source), "sa_shardkit.a", False, modules) == {"sa_shardkit.b"}
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]


def test_the_manager_sits_above_the_routing_data_path() -> None:
    """key -> ring -> stored ring -> placement -> routing / scatter / session -> manager."""
    graph = _graph()

    def reaches(start: str, goal: str) -> bool:
        todo, seen = [start], set()
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    below = ["ring", "ring_state", "placement", "routing", "session", "scatter", "replica_reads"]
    for name in below:
        assert not reaches(f"{PACKAGE}.{name}", f"{PACKAGE}.manager"), f"{name} imports the manager"
    assert reaches(f"{PACKAGE}.manager", f"{PACKAGE}.placement")
