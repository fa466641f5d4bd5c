"""The import-graph rule of docs/architecture.md, computed from the real sources: no import cycles in raysys/
(counting imports inside functions too, which hide a cycle from Python but not from a reader), and no module
importing another's private names."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raysys"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: dict) -> str | None:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in modules else None


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """({module: modules of raysys it imports}, [(importer, module, private name)])."""
    modules, edges, private = _modules(), {}, []
    for mod, path in modules.items():
        edges[mod] = set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [(f"{base}.{a.name}", (base, a.name)) for a in node.names]
            else:
                continue
            for name, imported in targets:
                target = _owner(name, modules)
                if target is None or not name.startswith("raysys"):
                    continue
                if target != mod:
                    edges[mod].add(target)
                if imported and name not in modules and imported[1].startswith("_") \
                        and not imported[1].startswith("__"):
                    private.append((mod, imported[0], imported[1]))
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    edges, _ = import_graph()
    assert {"raysys.store", "raysys.tracking", "raysys.hyperrep.model", "raysys.pipeline"} <= set(edges)
    assert "raysys.store" in edges["raysys.hyperrep.train"]  # a top-level import
    assert "raysys.hyperrep.train" in edges["raysys.pipeline"]  # one inside a function


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_raysys_has_no_import_cycles():
    found = cycles(import_graph()[0])
    assert found == [], f"import cycles in raysys/ (move the shared code, see docs/architecture.md): {found}"


def test_no_module_imports_another_modules_private_names():
    private = import_graph()[1]
    assert private == [], f"make these public or move them to the module that uses them: {private}"


def test_the_module_map_of_docs_architecture_names_every_module_and_only_real_ones():
    import re

    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = doc.split("## Module map", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `(raysys/[^`]+)`", table, re.M))
    assert named, "no module map table in docs/architecture.md"
    for entry in named:
        assert (PACKAGE.parent / entry).exists(), f"docs/architecture.md names {entry}, which does not exist"
    packages = {e for e in named if e.endswith("/")}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        covered = rel in named or any(rel.startswith(p) for p in packages)
        assert covered, f"{rel} is missing from the module map in docs/architecture.md"
