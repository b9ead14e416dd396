"""What both standalone op-model specs (scan_model.ScanModelSpec, ssd_model.SSDModelSpec) check of
their fields, written once, and the I/O dtypes they take."""

from __future__ import annotations

from onnx import TensorProto

from ..errors import ScanExportError

ELEM_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1  # True is an int, and no size


def check_op_spec(spec, sizes: tuple[str, ...], divided: str) -> None:
    """spec's sizes (fields: a positive integer, or None for dynamic), chunk_size, groups (which must
    divide the size named `divided`, B and C being shared by groups of it) and dtype; one line naming
    the field otherwise."""
    for name in sizes:
        v = getattr(spec, name)
        if v is not None and not _positive_int(v):
            raise ScanExportError(f"{name}: expected a positive integer or None (dynamic), got {v!r}")
    if not _positive_int(spec.chunk_size):
        raise ScanExportError(f"chunk_size: expected a positive integer, got {spec.chunk_size!r}")
    if not _positive_int(spec.groups):
        raise ScanExportError(f"groups must be >= 1, got {spec.groups}")
    total = getattr(spec, divided)
    if total is not None and total % spec.groups:
        raise ScanExportError(f"{divided}={total} must be divisible by groups={spec.groups}")
    if spec.dtype not in ELEM_TYPES:
        raise ScanExportError(f"dtype must be one of {sorted(ELEM_TYPES)}, got {spec.dtype!r}")
