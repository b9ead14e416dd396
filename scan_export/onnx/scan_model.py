"""Standalone op models: one selective scan as a complete ONNX model, with named, dynamic I/O.

Inputs  u, delta, A, B, C, D, z, delta_bias, initial_state   (each optional one can be left out)
Outputs out, last_state
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import onnx
from onnx import helper

from ..reference.selective_scan import DEFAULT_CHUNK_SIZE
from .lowering.graph_builder import GraphBuilder, value_info
from .lowering.selective_scan import SelectiveScanConfig, emit_selective_scan
from .op_spec import ELEM_TYPES, check_op_spec
from .targets import DEFAULT_SCAN_FORM, DEFAULT_TARGET, SCAN_FORMS, resolve_target
from ..errors import ScanExportError

SPEC_KEY = "scan_export.scan_spec"


@dataclass(frozen=True)
class ScanModelSpec:
    """What a standalone selective-scan model exposes. None for dim/dstate means dynamic."""

    dim: int | None = None
    dstate: int | None = None
    groups: int = 1
    with_D: bool = True
    with_z: bool = True
    with_delta_bias: bool = True
    with_initial_state: bool = True
    delta_softplus: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dtype: str = "float32"
    scan_form: str = DEFAULT_SCAN_FORM  # "sequential" | "chunked", see lowering/selective_scan.py

    def __post_init__(self):
        check_op_spec(self, sizes=("dim", "dstate"), divided="dim")
        if self.scan_form not in SCAN_FORMS:
            raise ScanExportError(f"scan_form: expected one of {list(SCAN_FORMS)}, got {self.scan_form!r}")

    def input_shapes(self) -> dict[str, list]:
        d = self.dim if self.dim is not None else "dim"
        n = self.dstate if self.dstate is not None else "dstate"
        bc = ["batch", n, "seqlen"] if self.groups == 1 else ["batch", self.groups, n, "seqlen"]
        shapes = {
            "u": ["batch", d, "seqlen"], "delta": ["batch", d, "seqlen"], "A": [d, n], "B": bc, "C": bc,
            "D": [d], "z": ["batch", d, "seqlen"], "delta_bias": [d], "initial_state": ["batch", d, n],
        }
        present = {"D": self.with_D, "z": self.with_z, "delta_bias": self.with_delta_bias,
                   "initial_state": self.with_initial_state}
        return {k: v for k, v in shapes.items() if present.get(k, True)}

    def output_shapes(self) -> dict[str, list]:
        shapes = self.input_shapes()
        return {"out": shapes["u"], "last_state": ["batch", shapes["A"][0], shapes["A"][1]]}


def build_scan_model(spec: ScanModelSpec = ScanModelSpec(), target: str = DEFAULT_TARGET,
                     opset: int | None = None) -> onnx.ModelProto:
    tgt = resolve_target(target, opset)
    io = ELEM_TYPES[spec.dtype]
    cfg = SelectiveScanConfig(
        io_dtype=io, bc_layout="variable" if spec.groups == 1 else "grouped",
        delta_softplus=spec.delta_softplus, chunk_size=spec.chunk_size, form=spec.scan_form,
    )
    shapes = spec.input_shapes()
    gb = GraphBuilder("selective_scan")
    names = {k: (k if k in shapes else None) for k in
             ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")}
    out, last_state = emit_selective_scan(gb, cfg, **names)
    state_type = cfg.compute_dtype
    param_type = {"A": state_type, "D": state_type, "delta_bias": state_type, "initial_state": state_type}
    out_shapes = spec.output_shapes()
    return finish_op_model(
        gb, "selective_scan", tgt, SPEC_KEY, spec,
        inputs=[value_info(k, param_type.get(k, io), s) for k, s in shapes.items()],
        outputs=[(out, value_info("out", io, out_shapes["out"])),
                 (last_state, value_info("last_state", state_type, out_shapes["last_state"]))],
    )


def finish_op_model(gb: GraphBuilder, name: str, tgt, spec_key: str, spec, inputs, outputs) -> onnx.ModelProto:
    """Name the outputs, pin IR version and opset, store the spec in the metadata, full-check.

    outputs: [(internal value name, public ValueInfoProto)]."""
    for value, info in outputs:
        gb.nodes.append(helper.make_node("Identity", [value], [info.name], name=f"{info.name}_identity"))
    model = helper.make_model(
        gb.graph(name, inputs, [info for _, info in outputs]),
        opset_imports=[helper.make_opsetid("", tgt.opset)], ir_version=tgt.ir_version, producer_name="scan_export",
    )
    helper.set_model_props(model, {spec_key: json.dumps(asdict(spec))})
    onnx.checker.check_model(model, full_check=True)
    return model


def read_scan_spec(model: onnx.ModelProto) -> ScanModelSpec:
    """The ScanModelSpec a model was built from (stored in its metadata)."""
    props = {p.key: p.value for p in model.metadata_props}
    if SPEC_KEY not in props:
        raise ScanExportError(f"not a scan_export op model: metadata key {SPEC_KEY!r} is missing")
    return ScanModelSpec(**json.loads(props[SPEC_KEY]))
