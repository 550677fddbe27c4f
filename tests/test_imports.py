"""Imports point one way: http -> worker_pool -> backend, the store behind it, core at the bottom.

Read from the source with ``ast`` (nothing is imported), so a cycle or a layer breach fails
here with the modules named, before it can bite at import time. Imports under
``if TYPE_CHECKING:`` count too: a type-only cycle is still a tangle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

# What each layer may import, by module prefix. Anything of ours not listed is a breach.
LAYERS = {
    "thinker.core": ("thinker.core",),
    "backend": ("backend", "thinker.core"),
    "thinker.store": ("thinker.store", "thinker.core"),
    "thinker.obs": ("thinker.obs", "thinker.core", "thinker.store"),
    "worker_pool": ("worker_pool", "thinker.core", "thinker.store", "thinker.obs"),
    "thinker.http": ("thinker", "worker_pool", "backend"),
    "thinker.keys": ("thinker.keys", "thinker.core", "thinker.store", "thinker.http.auth"),
    "app": ("app", "thinker", "worker_pool", "backend"),
}
OURS = ("thinker", "backend", "worker_pool", "app", "client_example")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("thinker", "backend") or (len(rel.parts) == 1 and rel.stem in OURS):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports (``from a import b`` counts a.b when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def layer_of(name: str) -> str | None:
    matches = [layer for layer in LAYERS if name == layer or name.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def test_imports_point_one_way():
    breaches = []
    for name, targets in graph().items():
        layer = layer_of(name)
        if layer is None:
            continue
        allowed = LAYERS[layer]
        for target in targets:
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                breaches.append(f"{name} ({layer}) imports {target}")
    assert not breaches, "imports against the layering:\n" + "\n".join(sorted(breaches))


def test_the_checker_sees_a_cycle(tmp_path):
    """The checker itself can fail: two modules importing each other are found."""
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    modules["a"].write_text("import b\n")
    modules["b"].write_text("from a import x\n")
    assert imports_of("a", modules["a"], modules) == {"b"}
    assert imports_of("b", modules["b"], modules) == {"a"}
