"""Imports flow one way: no module of peftkit imports one that imports it back.

The graph is read from the source (``ast``), with imports inside functions counted too: a circle
held together by a deferred import is still a circle. Importing ``peftkit.a.b`` also runs
``peftkit.a``'s ``__init__`` (unless the importer lives in ``peftkit.a``), so that edge counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` within peftkit, at any depth of the module's code."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {  # `if TYPE_CHECKING:` imports never run
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from P import a`: the submodule P.a when there is one, else a name P defines
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]  # fmt: skip
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith("peftkit") else None
                if target is None or target == module:
                    continue
                graph[module].add(target)
                parts = target.split(".")
                for k in range(1, len(parts)):  # the packages whose __init__ runs first
                    ancestor = ".".join(parts[:k])
                    if ancestor != module and not module.startswith(ancestor + "."):
                        graph[module].add(ancestor)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest circle through each module that lies on one."""
    found = []
    for start in sorted(graph):
        paths, frontier = {start: [start]}, [start]
        while frontier and not any(start in graph[v] for v in frontier):
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
            frontier = nxt
        ends = [v for v in frontier if start in graph[v]]
        if ends:
            cycle = [*paths[min(ends)], start]
            if sorted(cycle[:-1]) not in [sorted(c[:-1]) for c in found]:
                found.append(cycle)
    return found


def test_the_graph_sees_deferred_imports():
    graph = import_graph()
    assert "peftkit.config" in graph["peftkit.methods.lora_config"]  # a top-level import
    assert "peftkit.quant.load" in graph["peftkit.models"]  # an import inside a function
    assert "peftkit.methods" in graph["peftkit.tuner"]  # the package __init__ runs first


def test_no_module_imports_one_that_imports_it_back():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_base_model_loading_and_the_task_table_import_no_task():
    graph = import_graph()
    for module in ("peftkit.models", "peftkit.task_types", "peftkit.model_sources"):
        assert not any(t.startswith("peftkit.tasks") for t in graph[module]), module
