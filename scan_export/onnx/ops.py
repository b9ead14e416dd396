"""ONNX side of the custom ops: the exporter's translation emits one scan_export-domain node, which
`export.lower_custom_ops` replaces with the graph from lowering/ (a Scan over time or a Loop over chunks).
"""

from __future__ import annotations

import torch

from ..reference.custom_ops import CONV_INPUTS, SCAN_INPUTS, SSD_INPUTS
from ..reference.moe_op import MOE_INPUTS
from ..reference.selective_scan import DEFAULT_CHUNK_SIZE

ONNX_DOMAIN = "scan_export"


def _register_onnx_schema(op_type: str, inputs, outputs, n_required: int, attributes: dict):
    """The exporter's tracer only emits ops it has a schema for, so describe our node to onnx."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(op_type, ONNX_DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    ints = ["tensor(int32)", "tensor(int64)"]  # seq_idx
    option = OpSchema.FormalParameterOption
    params = [OpSchema.FormalParameter(name, f"T_{name}", param_option=option.Optional if i >= n_required else option.Single)
              for i, name in enumerate(inputs)]
    outs = [OpSchema.FormalParameter(name, f"T_{name}") for name in outputs]
    schema = OpSchema(
        op_type, ONNX_DOMAIN, 1, doc=f"scan_export {op_type}; replaced by scan_export.onnx.export with its lowering (lowering/).",
        inputs=params, outputs=outs, type_constraints=[(q.type_str, ints if q.name == "seq_idx" else floats, "") for q in params + outs],
        attributes=[OpSchema.Attribute(name, kind, "") for name, kind in attributes.items()],
    )
    onnx.defs.register_schema(schema)


def onnx_translation_table() -> dict:
    """custom_translation_table entries for torch.onnx.export(dynamo=True)."""
    import onnx_ir as ir
    import onnxscript

    from onnx.defs import OpSchema

    INT, FLOAT, STRING = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT, OpSchema.AttrType.STRING
    _register_onnx_schema("SelectiveScan", SCAN_INPUTS, ("out", "last_state"), 5,
                          {"delta_softplus": INT, "chunk_size": INT, "bc_layout": STRING, "io_dtype": INT})
    _register_onnx_schema("SSDScan", SSD_INPUTS, ("y", "final_states"), 5,
                          {"chunk_size": INT, "dt_softplus": INT, "dt_limit_lo": FLOAT, "dt_limit_hi": FLOAT,
                           "d_per_channel": INT, "io_dtype": INT, "heads": INT, "state_round": INT})
    _register_onnx_schema("CausalConv", CONV_INPUTS, ("y", "new_state"), 3, {"kernel": INT})
    _register_onnx_schema("MoeExperts", MOE_INPUTS, ("out",), 5, {"activation": STRING})
    opset = onnxscript.values.Opset(ONNX_DOMAIN, 1)
    conv_node = onnxscript.values.Op(opset, "CausalConv")
    node = onnxscript.values.Op(opset, "SelectiveScan")
    ssd_node = onnxscript.values.Op(opset, "SSDScan")
    moe_node = onnxscript.values.Op(opset, "MoeExperts")

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                       delta_softplus: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
        b_layout, c_layout = ({2: "fixed", 3: "variable", 4: "grouped"}[len(t.shape)] for t in (B, C))
        layout = b_layout if b_layout == c_layout else f"{b_layout},{c_layout}"  # mixed B/C (mamba_ssm allows it)
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

    def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, chunk_size: int = 64,
                 dt_softplus: bool = False, dt_limit_lo: float = 0.0, dt_limit_hi: float = float("inf"),
                 state_round: str = ""):
        y, final = ssd_node(
            x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size=chunk_size, dt_softplus=int(dt_softplus),
            dt_limit_lo=float(dt_limit_lo), dt_limit_hi=min(float(dt_limit_hi), 3.0e38),
            d_per_channel=int(D is not None and len(D.shape) == 2), io_dtype=int(x.dtype),
            heads=x.shape[2] if isinstance(x.shape[2], int) else 0,
            state_round=int(getattr(ir.DataType, state_round.upper())) if state_round else 0, _outputs=2,
        )
        y.type, y.shape = ir.TensorType(x.dtype), x.shape
        state_dtype = ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
        final.type = ir.TensorType(state_dtype)
        final.shape = ir.Shape([x.shape[0], x.shape[2], x.shape[3], B.shape[3]])
        return y, final

    def causal_conv(x, conv_state, weight, bias=None):
        y, state = conv_node(x, conv_state, weight, bias, kernel=weight.shape[-1], _outputs=2)
        y.type, y.shape = ir.TensorType(x.dtype), x.shape
        state.type, state.shape = ir.TensorType(x.dtype), conv_state.shape
        return y, state

    def moe_experts(x, top_k_index, top_k_weights, gate_up, down, activation: str = "swiglu"):
        out = moe_node(x, top_k_index, top_k_weights, gate_up, down, activation=activation)
        out.type, out.shape = ir.TensorType(x.dtype), x.shape
        return out

    return {torch.ops.scan_export.moe_experts.default: moe_experts,
            torch.ops.scan_export.causal_conv.default: causal_conv,
            torch.ops.scan_export.selective_scan.default: selective_scan,
            torch.ops.scan_export.ssd_scan.default: ssd_scan}
