"""No import cycles between the modules of ``service/``.

The graph is read from the source with ``ast`` (every ``import``, also the lazy ones inside
functions), so a cycle hidden by a function-level import is still a cycle: it means two modules
own halves of one concept. An edge goes to the module an import names: ``import a.b.c`` and
``from a.b import c`` (``c`` a submodule) depend on ``a.b.c``; ``from a.b import name`` depends on
``a.b`` itself (its ``__init__``). The parent packages a submodule import runs on the way are not
edges: each ``__init__`` re-exports its submodules, so counting them would make every package a
cycle by construction.
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"


def _modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``) for every ``.py`` under it."""
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported(name: str, is_package: bool, node: ast.AST, modules: dict) -> list[str]:
    """The dotted names one import statement of module ``name`` refers to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the package holding ``name``
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module → the modules of the same package tree it imports (anywhere in the file)."""
    modules = _modules(package_dir)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported(name, is_package, node, modules):
                while target and target not in modules:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def _describe(graph: dict[str, set[str]], group: list[str]) -> str:
    return "; ".join(f"{m} -> {sorted(graph[m] & set(group))}" for m in group)


def test_service_modules_import_without_cycles() -> None:
    graph = import_graph(SERVICE)
    assert "service.registry.load" in graph and len(graph) > 50  # the walk saw the package
    cycles = import_cycles(graph)
    assert cycles == [], "import cycles: " + " | ".join(_describe(graph, g) for g in cycles)


def test_registry_load_and_text_import_one_way() -> None:
    """The cycle this test was written for: ``load`` (``pull``) uses ``text``, never back."""
    graph = import_graph(SERVICE)
    assert "service.registry.text" in graph["service.registry.load"]
    assert "service.registry.load" not in graph["service.registry.text"]
    assert "service.registry.lookup" in graph["service.registry.text"]


def test_a_cycle_through_a_lazy_import_is_found(tmp_path: Path) -> None:
    """The graph sees imports inside functions, relative ones and ``from pkg import module``."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import f\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n\ndef f():\n    return b.g()\n")
    (package / "sub" / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (package / "sub" / "c.py").write_text("from pkg.sub.b import g\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.sub.b"}  # the parent packages run on the way: no edge
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]
