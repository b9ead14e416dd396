"""The built-in families' model types, read from their declarations without importing them: the CLI's
parser lists them, and building it must not import torch (the family files do). A static read of
reference/models/families/: the family files its __init__.py imports (`from . import ...`, in order), then
each file's Family(...) calls in order;
tests/test_family_registry.py checks it against the registry itself."""

from __future__ import annotations

import ast
from pathlib import Path

FAMILIES_DIR = Path(__file__).parent / "reference" / "models" / "families"


def _constants(tree: ast.Module) -> dict:
    """The module's NAME = <literal> assignments (a family file's MODEL_TYPE)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def declared() -> list[tuple[str, set[str], list[str]]]:
    """[(model_type, the Family(...) keywords given a value other than an empty literal, its bench_configs'
    names)] in registry order."""
    init = ast.parse((FAMILIES_DIR / "__init__.py").read_text())
    modules = [a.name for node in init.body if isinstance(node, ast.ImportFrom) and node.level == 1
               and node.module is None for a in node.names]
    out = []
    for name in modules:
        tree = ast.parse((FAMILIES_DIR / f"{name}.py").read_text())
        names = _constants(tree)
        calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
        for node in calls:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Family":
                kw = {k.arg: k.value for k in node.keywords}
                value = kw["model_type"]
                model_type = value.value if isinstance(value, ast.Constant) else names[value.id]
                given = {k for k, v in kw.items() if not (isinstance(v, (ast.Dict, ast.Tuple)) and not
                                                          (getattr(v, "keys", None) or getattr(v, "elts", None)))}
                bench = kw.get("bench_configs")
                keys = [k.value for k in bench.keys] if isinstance(bench, ast.Dict) else []
                out.append((model_type, given, keys))
    return out


def model_types() -> tuple[str, ...]:
    return tuple(t for t, _, _ in declared())


def bench_model_types() -> tuple[str, ...]:
    """The families that declare bench shapes (bench --model --model-type)."""
    return tuple(t for t, given, _ in declared() if "bench_configs" in given)


def bench_configs() -> dict[str, list[str]]:
    """{model_type: its bench --configs names}, for the families that declare bench shapes."""
    return {t: keys for t, given, keys in declared() if "bench_configs" in given}
