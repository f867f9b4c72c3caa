"""The import graph of the packages follows DESIGN.md's layer table and has no cycles.

Read statically (``ast``, nothing is imported): every ``import`` and ``from ...
import`` of ``sagellm_kv_cache``, ``traces``, ``sim`` and ``cli``, including the
ones inside functions, is an edge from the importing module to the module it
names (``from pkg import name`` names ``pkg.name`` when that is a module).

- Layers: ``sagellm_kv_cache`` <- ``traces`` <- ``sim`` <- ``cli``; an import may
  only go to its own layer or one below, and the library imports no plotting
  and no workbench-only package (those are the ``[workbench]`` extra).
- Cycles: the imports that run when a module is first imported (module level,
  outside ``if TYPE_CHECKING:``) form no cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: DESIGN.md's layout table, bottom first: each package may import those at or below it.
LAYERS = ("sagellm_kv_cache", "traces", "sim", "cli")
#: Third-party packages the library must never import (plotting; the workbench extra's own).
NOT_IN_LIBRARY = ("matplotlib", "seaborn", "click", "tqdm", "scipy")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module):
    """(node, at_module_level) for every import statement in ``tree``."""
    stack = [(node, True) for node in tree.body]
    while stack:
        node, top = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, top
            continue
        inner_top = top and not isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
        )
        if isinstance(node, ast.If) and _is_type_checking(node):
            inner_top = False
        # a class body runs at import time, a function body does not
        if isinstance(node, ast.ClassDef):
            inner_top = top
        stack.extend((child, inner_top) for child in ast.iter_child_nodes(node))


def _edges(modules: dict[str, Path]):
    """(importer, imported, line, module_level) for every import of a package module,
    and (importer, top-level third-party name, line) for the rest."""
    internal, external = [], []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node, top in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    prefix = node.module or ""
                targets = [
                    f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                    for alias in node.names
                ]
            for target in targets:
                root = target.partition(".")[0]
                if root in LAYERS:
                    while target not in modules and "." in target:
                        target = target.rpartition(".")[0]
                    internal.append((name, target, node.lineno, top))
                else:
                    external.append((name, root, node.lineno))
    return internal, external


def _layer(module: str) -> int:
    return LAYERS.index(module.partition(".")[0])


def test_imports_only_go_down_the_layer_table():
    modules = _modules()
    internal, external = _edges(modules)
    upward = sorted(
        f"{modules[a].relative_to(ROOT)}:{line}: {a} imports {b}"
        for a, b, line, _ in internal
        if _layer(b) > _layer(a)
    )
    plotting = sorted(
        f"{modules[a].relative_to(ROOT)}:{line}: {a} imports {b}"
        for a, b, line in external
        if a.startswith("sagellm_kv_cache") and b in NOT_IN_LIBRARY
    )
    assert not upward, "imports going up the layer table:\n" + "\n".join(upward)
    assert not plotting, "the library imports workbench packages:\n" + "\n".join(plotting)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_no_import_cycles_between_modules():
    modules = _modules()
    internal, _ = _edges(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], str] = {}
    for a, b, line, top in internal:
        if top and a != b:
            graph[a].add(b)
            where.setdefault((a, b), f"{modules[a].relative_to(ROOT)}:{line}")
    report = []
    for component in _cycles(graph):
        members = set(component)
        edges = sorted(
            f"  {where[(a, b)]}: {a} -> {b}" for a in component for b in graph[a] & members
        )
        report.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not report, "module-level import cycles:\n" + "\n".join(report)


def test_the_walker_sees_relative_and_function_level_imports():
    # guards the test itself: a known relative import and a known lazy one are found
    modules = _modules()
    internal, _ = _edges(modules)
    seen = {(a, b, top) for a, b, _, top in internal}
    assert ("cli.main", "cli.replay_cmds", True) in seen
    assert ("cli.entry", "cli.main", False) in seen
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
