"""Standalone Gated DeltaNet op models: the recurrence as a complete ONNX model with named, dynamic I/O.

Inputs  q, k: (batch, seqlen, key_heads, key_dim), v: (batch, seqlen, heads, value_dim),
        g, beta: (batch, seqlen, heads), initial_state: (batch, heads, key_dim, value_dim) (optional)
Outputs o: (batch, seqlen, heads, value_dim), final_state: (batch, heads, key_dim, value_dim)
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from ..errors import ScanExportError
from ..reference.gated_delta import GDN_DEFAULT_CHUNK_SIZE
from .lowering.gated_delta import GatedDeltaConfig, emit_gated_delta
from .lowering.graph_builder import GraphBuilder, value_info
from .scan_model import finish_op_model
from .targets import DEFAULT_TARGET, resolve_target

GDN_SPEC_KEY = "scan_export.gated_delta_spec"
# Only float32 and float64 I/O are offered and tested so far; the lowering would compute float16
# inputs in float32 (emit_gated_delta casts), but that path has no tests yet.
GDN_DTYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}


@dataclass(frozen=True)
class GatedDeltaModelSpec:
    form: str = "sequential"  # "sequential" (Scan over time) | "chunked" (Scan over chunks of chunk_size)
    chunk_size: int = GDN_DEFAULT_CHUNK_SIZE
    use_qk_l2norm: bool = True
    with_initial_state: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in GDN_DTYPES:
            raise ScanExportError(f"dtype must be float32 or float64, got {self.dtype!r}")

    def input_shapes(self) -> dict[str, list]:
        shapes = {"q": ["batch", "seqlen", "key_heads", "key_dim"], "k": ["batch", "seqlen", "key_heads", "key_dim"],
                  "v": ["batch", "seqlen", "heads", "value_dim"], "g": ["batch", "seqlen", "heads"],
                  "beta": ["batch", "seqlen", "heads"]}
        if self.with_initial_state:
            shapes["initial_state"] = ["batch", "heads", "key_dim", "value_dim"]
        return shapes


def build_gated_delta_model(spec: GatedDeltaModelSpec = GatedDeltaModelSpec(), target: str = DEFAULT_TARGET,
                            opset: int | None = None) -> onnx.ModelProto:
    tgt = resolve_target(target, opset)
    io = GDN_DTYPES[spec.dtype]
    cfg = GatedDeltaConfig(io_dtype=io, form=spec.form, chunk_size=spec.chunk_size, use_qk_l2norm=spec.use_qk_l2norm)
    shapes = spec.input_shapes()
    gb = GraphBuilder("gdn")
    o, final = emit_gated_delta(gb, cfg, "q", "k", "v", "g", "beta",
                                initial_state="initial_state" if spec.with_initial_state else None)
    return finish_op_model(
        gb, "gated_delta", tgt, GDN_SPEC_KEY, spec,
        inputs=[value_info(n, io, s) for n, s in shapes.items()],
        outputs=[(o, value_info("o", io, shapes["v"])),
                 (final, value_info("final_state", cfg.compute_dtype, ["batch", "heads", "key_dim", "value_dim"]))],
    )
