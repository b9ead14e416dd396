"""Which ONNX IR version and opset each runtime loads: set on purpose, never left to onnx's default.

onnx 1.23 writes IR 14 by default; onnxruntime-node/web 1.30 refuse IR > 13 and onnxruntime 1.18
refuses IR > 10 and opset > 21. Our lowerings need opset >= 18 (Pad/ReduceMax with axes inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_OPSET = 18


@dataclass(frozen=True)
class Target:
    name: str
    ir_version: int
    opset: int
    note: str


TARGETS = {
    t.name: t
    for t in (
        Target("portable", 10, 21, "onnxruntime >= 1.18, onnxruntime-node/web 1.30 (the default)"),
        Target("ort-1.18", 10, 21, "onnxruntime 1.18 and newer"),
        Target("node-1.30", 10, 21, "onnxruntime-node 1.30 (refuses IR > 13)"),
        Target("web-1.30", 10, 21, "onnxruntime-web 1.30 (refuses IR > 13)"),
    )
}
DEFAULT_TARGET = "portable"


def resolve_target(target: str = DEFAULT_TARGET, opset: int | None = None, ir_version: int | None = None) -> Target:
    """A named target, optionally with the opset or IR version raised or lowered by the user."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    base = TARGETS[target]
    opset = base.opset if opset is None else opset
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} for scan_export lowerings, got {opset}")
    return Target(base.name, base.ir_version if ir_version is None else ir_version, opset, base.note)
