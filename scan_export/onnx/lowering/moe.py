"""ONNX lowering of the routed experts (reference/moe_op.py): only the experts a token was routed
to are computed, so a token costs k expert MLPs whatever the expert count E.

x: (N, H), top_k_index: (N, k) int64, top_k_weights: (N, k), gate_up: (E, 2I, H) (gate rows first;
(E, I, H) for the non-gated "relu2" experts), down: (E, H, I). "geglu" is swiglu with GELU for silu.
Two forms, chosen at run time by an If on the number of (token, expert) pairs N·k:
  N·k ≤ E (decode): gather the k experts' matrices of every token, (N·k, 2I, H) and (N·k, H, I), and
    run them as one batched MatMul: no loop, and never more weight read than the E experts hold.
  N·k > E (prefill): a Loop over the E experts; each iteration gathers the rows routed to it
    (NonZero), runs its MLP on those rows only (Gemm), and scatter-adds them back (ScatterND add).
    Work is N·k rows of MLP in all; an expert nobody chose costs an iteration and no FLOPs.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .graph_builder import GraphBuilder, value_info


def _activation(gb: GraphBuilder, h, axis: int, activation: str, elem_type: int):
    """reference/moe_op.expert_activation: swiglu / geglu (gate, up halves along axis) or relu(h)²."""
    if activation == "relu2":
        r = gb.op("Relu", h)
        return gb.op("Mul", r, r)
    gate, up = gb.op("Split", h, axis=axis, num_outputs=2, n_out=2)
    if activation == "geglu":  # exact GELU as torch writes it: g · 0.5 · (1 + erf(g · 1/√2))
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        erf = gb.op("Erf", gb.op("Mul", gate, gb.const(0.5 ** 0.5, dtype)))
        act = gb.op("Mul", gb.op("Mul", gate, gb.const(0.5, dtype)), gb.op("Add", erf, gb.const(1.0, dtype)))
        return gb.op("Mul", act, up)
    return gb.op("Mul", gb.op("Mul", gate, gb.op("Sigmoid", gate)), up)


def emit_moe_experts(gb: GraphBuilder, x, top_k_index, top_k_weights, gate_up, down, elem_type: int,
                     activation: str = "swiglu"):
    """Returns out: (N, H)."""
    pairs = gb.op("Size", top_k_index)  # N·k
    e_ = gb.op("Slice", gb.op("Shape", gate_up), gb.ints(0), gb.ints(1))
    few = gb.op("Squeeze", gb.op("LessOrEqual", pairs, e_), gb.ints(0))

    # Gather form: every (token, slot) pair gets its expert's matrices; x is (N·k, H, 1) columns.
    # (Each branch takes its shapes itself: onnxruntime warns when an outer Shape/Slice feeds a subgraph.)
    g = gb.child("moe_gather")
    x_shape = g.op("Shape", x)
    n_ = g.op("Slice", x_shape, g.ints(0), g.ints(1))
    h_ = g.op("Slice", x_shape, g.ints(1), g.ints(2))
    k_ = g.op("Slice", g.op("Shape", top_k_index), g.ints(1), g.ints(2))
    flat = g.op("Reshape", top_k_index, g.ints(-1))  # (N·k,)
    xk = g.op("Expand", g.op("Unsqueeze", x, g.ints(1)), g.op("Concat", n_, k_, h_, axis=0))  # (N, k, H)
    xk = g.op("Reshape", xk, g.op("Concat", g.ints(-1), h_, g.ints(1), axis=0))  # (N·k, H, 1)
    act = _activation(g, g.op("MatMul", g.op("Gather", gate_up, flat, axis=0), xk), 1, activation, elem_type)  # (N·k, I, 1)
    y = g.op("MatMul", g.op("Gather", down, flat, axis=0), act)  # (N·k, H, 1)
    y = g.op("Mul", g.op("Reshape", y, g.op("Concat", n_, k_, h_, axis=0)), g.op("Unsqueeze", top_k_weights, g.ints(2)))
    y_gather = g.op("ReduceSum", y, g.ints(1), keepdims=0)  # (N, H)

    # Loop form: one iteration per expert, on the rows routed to it. The sum is kept in float32 for
    # float16/bfloat16 models: onnxruntime's CPU ScatterND has no float16 kernel for reduction "add"
    # (and transformers' experts accumulate in float32 too).
    acc_type = TensorProto.FLOAT if elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else elem_type
    lp = gb.child("moe_loop")
    body = lp.child("body")
    e, cond_in, acc = body.name("expert"), body.name("cond_in"), body.name("acc")
    hit = body.op("Equal", top_k_index, e)  # (N, k)
    weight = body.op("ReduceSum", body.op("Mul", top_k_weights, body.op("Cast", hit, to=elem_type)), body.ints(1),
                     keepdims=0)  # (N,): this expert's weight per token, 0 when not routed
    routed = body.op("ReduceMax", body.op("Cast", hit, to=TensorProto.INT32), body.ints(1), keepdims=0)  # (N,)
    rows = body.op("Reshape", body.op("NonZero", routed), body.ints(-1))  # (M,)
    act = _activation(body, body.op("Gemm", body.op("Gather", x, rows, axis=0), body.op("Gather", gate_up, e, axis=0),
                                    transB=1), 1, activation, elem_type)  # (M, I)
    y = body.op("Gemm", act, body.op("Gather", down, e, axis=0), transB=1)  # (M, H)
    y = body.op("Mul", y, body.op("Unsqueeze", body.op("Gather", weight, rows, axis=0), body.ints(1)))
    if acc_type != elem_type:
        y = body.op("Cast", y, to=acc_type)
    acc_out = body.op("ScatterND", acc, body.op("Unsqueeze", rows, body.ints(1)), y, reduction="add")
    cond_out = body.op("Identity", cond_in)
    body_graph = body.graph(
        "moe_expert",
        [value_info(e, TensorProto.INT64, []), value_info(cond_in, TensorProto.BOOL, []), value_info(acc, acc_type)],
        [value_info(cond_out, TensorProto.BOOL, []), value_info(acc_out, acc_type)],
    )
    zero = helper.make_tensor("zero", acc_type, [1], [0.0])
    zeros = lp.op("ConstantOfShape", lp.op("Shape", x), value=zero)  # (N, H)
    n_experts = lp.op("Squeeze", lp.op("Slice", lp.op("Shape", gate_up), lp.ints(0), lp.ints(1)), lp.ints(0))
    y_loop = lp.op("Loop", n_experts, lp.const(True, np.bool_), zeros, body=body_graph)
    if acc_type != elem_type:
        y_loop = lp.op("Cast", y_loop, to=elem_type)

    return gb.op("If", few,
                 then_branch=g.graph("moe_gather", [], [value_info(y_gather, elem_type)]),
                 else_branch=lp.graph("moe_loop", [], [value_info(y_loop, elem_type)]))
