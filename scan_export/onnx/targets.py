"""Which ONNX IR version and opset each runtime loads: set on purpose, never left to onnx's default.

onnx 1.23 writes IR 14 by default; onnxruntime-node/web 1.30 refuse IR > 13 and onnxruntime 1.18
refuses IR > 10 and opset > 21. Our lowerings need opset >= 18 (Pad/ReduceMax with axes inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ScanExportError

MIN_OPSET = 18


@dataclass(frozen=True)
class Target:
    name: str
    ir_version: int
    opset: int
    note: str
    # onnxruntime-genai loads the export as it is: logits_to_keep gets a default (genai never feeds
    # it) and export_model writes genai_config.json. Off elsewhere: onnxruntime-web 1.30 refuses
    # to be fed an input that has a default.
    genai: bool = False


TARGETS = {
    t.name: t
    for t in (
        Target("portable", 10, 21, "onnxruntime >= 1.18, onnxruntime-node/web 1.30 (the default)"),
        Target("ort-1.18", 10, 21, "onnxruntime 1.18 and newer"),
        Target("node-1.30", 10, 21, "onnxruntime-node 1.30 (refuses IR > 13)"),
        Target("web-1.30", 10, 21, "onnxruntime-web 1.30 (refuses IR > 13)"),
        Target("ort-1.32", 13, 27, "onnxruntime 1.32: opset 27 LinearAttention / CausalConvWithState (native)"),
        Target("genai", 10, 21, "onnxruntime-genai >= 0.18 (and onnxruntime >= 1.18 hosts other than the web)",
               genai=True),
    )
}
# How Mamba-1 scans are lowered (lowering/selective_scan.py): a Scan over time steps, or a Loop
# over chunks that is parallel inside each chunk. Both run on every target.
SCAN_FORMS = ("sequential", "chunked")
DEFAULT_SCAN_FORM = "sequential"
# The opset each lowering needs at least.
LOWERING_MIN_OPSET = {"portable": MIN_OPSET, "native": 27}
DEFAULT_TARGET = "portable"


def max_opset() -> int:
    """The newest default-domain opset this onnx package defines: torch's exporter cannot write a
    later one (it fell back to an older opset while the description claimed the asked-for one)."""
    import onnx

    return onnx.defs.onnx_opset_version()


def resolve_target(target: str = DEFAULT_TARGET, opset: int | None = None, ir_version: int | None = None,
                   lowering: str = "portable") -> Target:
    """A named target, optionally with the opset or IR version raised or lowered by the user.

    Refuses a lowering the target cannot run (native needs opset 27, which IR <= 10 targets lack)."""
    if target not in TARGETS:
        raise ScanExportError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    if lowering not in LOWERING_MIN_OPSET:
        raise ScanExportError(f"lowering must be one of {sorted(LOWERING_MIN_OPSET)}, got {lowering!r}")
    base = TARGETS[target]
    opset = base.opset if opset is None else opset
    if opset < MIN_OPSET:
        raise ScanExportError(f"opset must be >= {MIN_OPSET} for scan_export lowerings, got {opset}")
    if opset > max_opset():
        raise ScanExportError(f"opset must be <= {max_opset()} (the newest this onnx defines, and onnxruntime "
                              f"runs), got {opset}")
    need = LOWERING_MIN_OPSET[lowering]
    if opset < need:
        able = sorted(t.name for t in TARGETS.values() if t.opset >= need)
        raise ScanExportError(f"the {lowering} lowering needs opset >= {need} (LinearAttention), but target {target!r} "
                         f"uses opset {opset} ({base.note}); use --target {' or '.join(able)}, or --lowering portable")
    if ir_version is None and opset > 21 and base.ir_version < 13:
        ir_version = 13  # opset 22..27 models need IR 13
    return replace(base, ir_version=base.ir_version if ir_version is None else ir_version, opset=opset)
