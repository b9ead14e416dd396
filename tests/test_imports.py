"""The package's import graph (issue 18): no module imports, directly or through others, a module
that imports it back. Found by an AST walk of every `import` in scan_export, function-level ones
included (a lazy import still ties the two modules together)."""

import ast
from pathlib import Path

import scan_export

ROOT = Path(scan_export.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The scan_export modules `path` imports (from-imports of a package's submodule count as that submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` the module pkg
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_imports():
    """The walk itself: relative, nested and function-level imports are all found."""
    g = graph()
    assert "scan_export.errors" in g["scan_export.onnx.model_export"]  # `from ..errors import ...`
    assert "scan_export.onnx.export" in g["scan_export.onnx.model_export"]  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_inside_the_package():
    """Importing a submodule is not counted as importing its parent packages' __init__ (Python
    always does that first, whatever the importer), so a package that re-exports its submodules is
    no cycle; a submodule that imports a name from its own package's __init__ is counted, and would be."""
    found = cycles(graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_contract_is_a_leaf():
    """contract/ is read by onnx/ (which writes scan_export.json), runtime/ and the hosts' tests: it
    may import only its own modules and scan_export.errors, so reading an export never drags in
    torch or the exporter."""
    g = graph()
    contract = {m for m in g if m == "scan_export.contract" or m.startswith("scan_export.contract.")}
    assert contract, "no scan_export.contract package"
    for m in sorted(contract):
        outside = g[m] - contract - {"scan_export.errors"}
        assert not outside, f"{m} imports {sorted(outside)}"
    assert g["scan_export.errors"] <= set(), "errors.py must stay a leaf"
