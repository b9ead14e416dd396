"""ONNX side of the custom ops: the exporter's translation emits one scan_export-domain node, which
`export.lower_custom_ops` replaces with the Loop graph from lowering/.
"""

from __future__ import annotations

import torch

from ..reference.custom_ops import SCAN_INPUTS, selective_scan_fn, selective_scan_op  # noqa: F401 (re-export)
from ..reference.selective_scan import DEFAULT_CHUNK_SIZE

ONNX_DOMAIN = "scan_export"


def _register_onnx_schema():
    """The exporter's tracer only emits ops it has a schema for, so describe our node to onnx."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("SelectiveScan", ONNX_DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    optional = OpSchema.FormalParameterOption.Optional
    params = [
        OpSchema.FormalParameter(name, f"T_{name}", param_option=optional if i >= 5 else OpSchema.FormalParameterOption.Single)
        for i, name in enumerate(SCAN_INPUTS)
    ]
    outs = [OpSchema.FormalParameter(name, f"T_{name}") for name in ("out", "last_state")]
    attr = OpSchema.Attribute
    schema = OpSchema(
        "SelectiveScan", ONNX_DOMAIN, 1,
        doc="Mamba-1 selective scan; replaced by scan_export.onnx.export with a Loop over chunks.",
        inputs=params, outputs=outs,
        type_constraints=[(p.type_str, floats, "") for p in params + outs],
        attributes=[
            attr("delta_softplus", OpSchema.AttrType.INT, ""),
            attr("chunk_size", OpSchema.AttrType.INT, ""),
            attr("bc_layout", OpSchema.AttrType.STRING, ""),
            attr("io_dtype", OpSchema.AttrType.INT, ""),
        ],
    )
    onnx.defs.register_schema(schema)


def onnx_translation_table() -> dict:
    """custom_translation_table entries for torch.onnx.export(dynamo=True)."""
    import onnx_ir as ir
    import onnxscript

    _register_onnx_schema()
    node = onnxscript.values.Op(onnxscript.values.Opset(ONNX_DOMAIN, 1), "SelectiveScan")

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                       delta_softplus: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
        layout = {2: "fixed", 3: "variable", 4: "grouped"}[len(B.shape)]
        out, last_state = node(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus=int(delta_softplus),
            chunk_size=chunk_size, bc_layout=layout, io_dtype=int(u.dtype), _outputs=2,
        )
        # No shape inference runs for a custom domain; type the outputs as the fake kernel does.
        out.type, out.shape = ir.TensorType(u.dtype), u.shape
        state_dtype = ir.DataType.DOUBLE if u.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
        last_state.type = ir.TensorType(state_dtype)
        last_state.shape = ir.Shape([u.shape[0], u.shape[1], A.shape[1]])
        return out, last_state

    return {torch.ops.scan_export.selective_scan.default: selective_scan}
