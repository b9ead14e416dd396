"""The model families, each declared once: a family file in this folder ends with `register(Family(...))`,
and every other module (loading, export, verify, tiny checkpoints, the CLI) asks this registry.

Adding a family: its file here and its name in the one import line below, whose order is the order model
types are listed to users (each file registers when imported). The CLI reads that line and the files'
Family(...) calls without importing them, so that building its parser needs no torch
(scan_export/family_names.py). A family registered at run time (register(), e.g. by a test) joins every
lookup here, after these. Family and the table live in registry.py, which imports no family file.
"""

from __future__ import annotations

# the family files, in listing order (isort: skip; the order is the meaning)
from . import mamba, bamba, granitemoehybrid, nemotron_h, falcon_h1, jamba, zamba2, lfm2, qwen3_5, qwen3_next  # noqa: F401, I001
from .registry import (GATED_DELTA, HYBRID_SHARPENED, NO_SCAN, SELECTIVE_SCAN, SSD, TINY_HYBRID, Family,  # noqa: F401
                       register, registered, unregister)


def families() -> tuple[Family, ...]:
    """Every family in registration order: the family files' in the import line's order (a file's own
    in its order), then any registered at run time."""
    return tuple(registered())


def get(model_type) -> Family | None:
    return next((f for f in families() if f.model_type == model_type), None)


def model_types() -> list[str]:
    return [f.model_type for f in families()]


def hybrid_types() -> list[str]:
    return [f.model_type for f in families() if f.hybrid]
