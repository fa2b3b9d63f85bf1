"""The package's layering, read from its imports with ``ast`` (lazy imports inside functions count).

Floors, bottom to top (README "Architecture"): ``errors`` / ``cache`` → ``codegen`` (the
tokenfx::* ops, a leaf) → ``ir`` → ``passes`` beside ``frontends`` (with ``assets``) →
``runtime`` → the entry points (``tokenfx`` itself, ``cli``, ``report``, ``demo``). A module
imports its own floor and the floors below; ``passes`` and ``frontends`` share a floor but do
not import each other, except the torch.compile backend (``frontends/dynamo.py``), which runs
the PassManager. And no import circle, of any length.
"""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

import tokenfx

PACKAGE = pathlib.Path(tokenfx.__file__).parent
RANK = {"base": 0, "codegen": 1, "ir": 2, "passes": 3, "frontends": 3, "runtime": 4, "entry": 5}
EXCEPTIONS = {("tokenfx.frontends.dynamo", "passes")}  # the backend runs the PassManager (DESIGN: frontends)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # ``from tokenfx.codegen import kv_write`` imports a module
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def _floor(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "entry"
    head = parts[1]
    if head in ("errors", "cache"):
        return "base"
    if head == "assets":
        return "frontends"
    if head in ("codegen", "ir", "passes", "frontends", "runtime"):
        return head
    return "entry"  # cli, report, demo, demo_decode


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in _imports(name, path, modules))
    return graph


def test_no_import_circle():
    circles = [sorted(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert circles == [], f"import circles: {circles}"


def test_no_upward_import():
    upward = []
    for source, target in _graph().edges:
        floor, target_floor = _floor(source), _floor(target)
        across = RANK[target_floor] == RANK[floor] and target_floor != floor
        if (RANK[target_floor] > RANK[floor] or across) and (source, target_floor) not in EXCEPTIONS:
            upward.append(f"{source} ({floor}) -> {target} ({target_floor})")
    assert upward == [], "imports against the layering:\n" + "\n".join(sorted(upward))


def test_the_reader_sees_real_imports():
    """The checker itself: it finds a known lazy import and a known relative-free package import."""
    graph = _graph()
    assert graph.has_edge("tokenfx.passes.kv_cache", "tokenfx.codegen.kv_write")  # imported inside a function
    assert graph.has_edge("tokenfx.runtime.executor", "tokenfx.runtime.regional")
    assert _floor("tokenfx.ir.tree") == "ir" and _floor("tokenfx.cli") == "entry"
