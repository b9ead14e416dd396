"""onnxruntime CPU time of the Gated DeltaNet lowerings on one shape (docs/numerics.md):
sequential Scan over time vs chunked Scan over WY chunks, optionally onnxruntime 1.32's opset-27
LinearAttention(update_rule="gated_delta"), all in one process on the same inputs.
    PYTHONPATH=$PWD python tools/bench_gated_delta.py [l b h dk dv threads reps]
"""

import sys
import time

import numpy as np
import onnxruntime as ort

from scan_export.onnx.gated_delta_model import GatedDeltaModelSpec, build_gated_delta_model
from scan_export.reference.gated_delta import make_gdn_inputs


def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(l=512, b=1, h=16, dk=128, dv=128, threads=2, reps=5, extra=None):
    """Round-robin over the forms, rep by rep, so machine load moves every form alike (the ratios
    are what is reported; this CPU is shared)."""
    kw = {n: t.numpy() for n, t in make_gdn_inputs("model_init", b, l, h, h, dk, dv).items()}
    runs = {form: (session(build_gated_delta_model(GatedDeltaModelSpec(form=form)), threads), lambda kw: kw)
            for form in ("sequential", "chunked")}
    runs.update({name: (session(model, threads), feeds) for name, (model, feeds) in (extra or {}).items()})
    outs = {name: sess.run(None, feeds(kw)) for name, (sess, feeds) in runs.items()}  # warm-up
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, (sess, feeds) in runs.items():
            t = time.perf_counter()
            sess.run(None, feeds(kw))
            times[name].append(time.perf_counter() - t)
    base = float(np.median(times["sequential"]))
    ref = outs["sequential"][0]
    print(f"l={l} b={b} h={h} dk={dk} dv={dv} threads={threads}, median of {reps} (round-robin)")
    for name, ts in times.items():
        ms = float(np.median(ts))
        diff = np.abs(outs[name][0] - ref).max() / np.abs(ref).max()
        print(f"  {name:12s} {1e3 * ms:9.2f} ms  ({ms / base:.2f}x sequential; o differs by {diff:.1e})")
    return times


def native_model(h, dk, dv, chunk_size=64):
    """onnxruntime 1.32's opset-27 LinearAttention(update_rule="gated_delta") on the same inputs and
    the same prologue (L2 norm, q·dk^-0.5 as its scale); key heads = value heads here. Measured only,
    not a product lowering yet."""
    import onnx
    from onnx import TensorProto, helper

    from scan_export.onnx.lowering.graph_builder import GraphBuilder, value_info

    gb = GraphBuilder("native")
    f = TensorProto.FLOAT

    def packed_l2(t):  # (b, l, h, d) -> normalised, (b, l, h·d)
        n = gb.op("Sqrt", gb.op("Add", gb.op("ReduceSum", gb.op("Mul", t, t), gb.ints(-1), keepdims=1),
                                gb.const(1e-6, np.float32)))
        return gb.op("Reshape", gb.op("Div", t, n), gb.ints(0, 0, -1))

    out, state = gb.op("LinearAttention", packed_l2("q"), packed_l2("k"), gb.op("Reshape", "v", gb.ints(0, 0, -1)),
                       "initial_state", "g", "beta", n_out=2, update_rule="gated_delta", q_num_heads=h,
                       kv_num_heads=h, scale=dk ** -0.5, chunk_size=chunk_size)
    o = gb.op("Reshape", out, gb.ints(0, 0, h, dv))
    gb.nodes.append(helper.make_node("Identity", [o], ["o"]))
    gb.nodes.append(helper.make_node("Identity", [state], ["final_state"]))
    ins = [value_info("q", f, ["b", "l", h, dk]), value_info("k", f, ["b", "l", h, dk]),
           value_info("v", f, ["b", "l", h, dv]), value_info("g", f, ["b", "l", h]), value_info("beta", f, ["b", "l", h]),
           value_info("initial_state", f, ["b", h, dk, dv])]
    outs = [value_info("o", f, ["b", "l", h, dv]), value_info("final_state", f, ["b", h, dk, dv])]
    model = helper.make_model(gb.graph("native_gdn", ins, outs), opset_imports=[helper.make_opsetid("", 27)],
                              ir_version=13)
    onnx.checker.check_model(model)
    return model


def contrib_model(hk, h, dk, dv, chunk_size=64):
    """onnxruntime's com.microsoft GatedDeltaNet (contrib op, version 1; schema from
    onnxruntime.capi._pybind_state.get_all_operator_schema()): rank-4 spelling, its own
    qk_l2_norm and default scale 1/sqrt(dk), native GQA over value heads; its state is V-major
    (b, h, dv, dk), so ours is transposed in and out. Measured only, not a product lowering."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["initial_state"], ["s_vmajor"], perm=[0, 1, 3, 2]),
        helper.make_node("GatedDeltaNet", ["q", "k", "v", "", "g", "beta", "s_vmajor"], ["o", "s_out"],
                         domain="com.microsoft", update_rule="gated_delta", qk_l2_norm=1, chunk_size=chunk_size),
        helper.make_node("Transpose", ["s_out"], ["final_state"], perm=[0, 1, 3, 2]),
    ]
    ins = [helper.make_tensor_value_info("q", f, ["b", "l", hk, dk]), helper.make_tensor_value_info("k", f, ["b", "l", hk, dk]),
           helper.make_tensor_value_info("v", f, ["b", "l", h, dv]), helper.make_tensor_value_info("g", f, ["b", "l", h]),
           helper.make_tensor_value_info("beta", f, ["b", "l", h]),
           helper.make_tensor_value_info("initial_state", f, ["b", h, dk, dv])]
    outs = [helper.make_tensor_value_info("o", f, None), helper.make_tensor_value_info("final_state", f, None)]
    model = helper.make_model(helper.make_graph(nodes, "contrib_gdn", ins, outs), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model


def exported_model(h, dk, dv, export_form):
    """A module calling gated_delta_rule, through a plain torch.onnx.export(dynamo=True) (dynamic
    batch and length, example l = 70): what the model families will ship."""
    import torch

    from scan_export.reference.gated_delta_export import gated_delta_rule

    class Rule(torch.nn.Module):
        def forward(self, q, k, v, g, beta, initial_state):
            return gated_delta_rule(q, k, v, g, beta, initial_state, export_form=export_form)

    kw = make_gdn_inputs("model_init", 1, 70, h, h, dk, dv)
    B, L = torch.export.Dim("batch"), torch.export.Dim("seqlen")
    dyn = {n: {0: B, 1: L} for n in ("q", "k", "v", "g", "beta")} | {"initial_state": {0: B}}
    return torch.onnx.export(Rule().eval(), (), kwargs=kw, dynamo=True, dynamic_shapes=dyn, opset_version=21).model_proto


if __name__ == "__main__":
    args = list(map(int, sys.argv[1:8]))
    l, b, h, dk, dv = (args + [512, 1, 16, 128, 128][len(args):])[:5]
    main(*args, extra={"native": (native_model(h, dk, dv), lambda kw: kw),
                       "contrib": (contrib_model(h, h, dk, dv), lambda kw: kw),
                       "exported seq": (exported_model(h, dk, dv, "sequential"), lambda kw: kw),
                       "exported chk": (exported_model(h, dk, dv, "chunked"), lambda kw: kw)})
