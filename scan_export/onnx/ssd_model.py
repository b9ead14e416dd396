"""Standalone Mamba-2 SSD op models: one scan as a complete ONNX model with named, dynamic I/O.

Inputs  x, dt, A, B, C, D, z, dt_bias, initial_states   (the optional ones can be left out)
Outputs y, final_states
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..reference.ssd import SSD_DEFAULT_CHUNK_SIZE
from .lowering.graph_builder import GraphBuilder, value_info
from .lowering.ssd import SSDConfig, emit_ssd_scan
from .op_spec import ELEM_TYPES, check_op_spec
from .scan_model import finish_op_model
from .targets import DEFAULT_TARGET, resolve_target

SSD_SPEC_KEY = "scan_export.ssd_spec"


@dataclass(frozen=True)
class SSDModelSpec:
    """None for heads/headdim/dstate means dynamic; groups is fixed by the B/C layout."""

    heads: int | None = None
    headdim: int | None = None
    dstate: int | None = None
    groups: int = 1
    with_D: bool = True
    d_per_channel: bool = False
    with_z: bool = False
    with_dt_bias: bool = True
    with_initial_states: bool = True
    dt_softplus: bool = True
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    chunk_size: int = SSD_DEFAULT_CHUNK_SIZE
    dtype: str = "float32"
    lowering: str = "portable"

    def __post_init__(self):
        check_op_spec(self, sizes=("heads", "headdim", "dstate"), divided="heads")
        object.__setattr__(self, "dt_limit", tuple(self.dt_limit))

    def input_shapes(self) -> dict[str, list]:
        h = self.heads or "heads"
        p = self.headdim or "headdim"
        n = self.dstate or "dstate"
        shapes = {
            "x": ["batch", "seqlen", h, p], "dt": ["batch", "seqlen", h], "A": [h],
            "B": ["batch", "seqlen", self.groups, n], "C": ["batch", "seqlen", self.groups, n],
            "D": [h, p] if self.d_per_channel else [h], "z": ["batch", "seqlen", h, p], "dt_bias": [h],
            "initial_states": ["batch", h, p, n],
        }
        present = {"D": self.with_D, "z": self.with_z, "dt_bias": self.with_dt_bias,
                   "initial_states": self.with_initial_states}
        return {k: v for k, v in shapes.items() if present.get(k, True)}


def build_ssd_model(spec: SSDModelSpec = SSDModelSpec(), target: str = DEFAULT_TARGET,
                    opset: int | None = None) -> onnx.ModelProto:
    tgt = resolve_target(target, opset, lowering=spec.lowering)
    io = ELEM_TYPES[spec.dtype]
    cfg = SSDConfig(io_dtype=io, chunk_size=spec.chunk_size, dt_softplus=spec.dt_softplus,
                    dt_limit=spec.dt_limit, d_per_channel=spec.d_per_channel, lowering=spec.lowering,
                    heads=spec.heads)
    shapes = spec.input_shapes()
    gb = GraphBuilder("ssd")
    names = {k: (k if k in shapes else None) for k in
             ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")}
    y, final = emit_ssd_scan(gb, cfg, **names)
    f = cfg.compute_dtype
    params = {"A": f, "D": f, "dt_bias": f, "initial_states": f}
    s = shapes
    return finish_op_model(
        gb, "ssd_scan", tgt, SSD_SPEC_KEY, spec,
        inputs=[value_info(k, params.get(k, io), shape) for k, shape in shapes.items()],
        outputs=[(y, value_info("y", io, s["x"])),
                 (final, value_info("final_states", f, ["batch", s["x"][2], s["x"][3], s["B"][3]]))],
    )
