"""Gated DeltaNet float32 error against the float64 oracle, per regime and length (docs/numerics.md).

Prints, per regime, the worst over lengths of max|o − o_ref| / max|o_ref| (and the same for the
final state) for: our sequential form in float32, our chunked form, transformers' chunk form,
our two ONNX graphs in onnxruntime (CPU), and onnxruntime 1.32's opset-27
LinearAttention(update_rule="gated_delta") (tools/bench_gated_delta.native_model)
and its com.microsoft GatedDeltaNet contrib op (contrib_model).
    PYTHONPATH=$PWD python tools/measure_gated_delta.py [dk dv]
"""

import sys

import torch

from scan_export.reference.gated_delta import (GDN_REGIMES, gated_delta_rule_chunked, gated_delta_rule_ref,
                                               make_gdn_inputs)


def rel(a, e):
    return ((a.double() - e).abs().max() / e.abs().max()).item()


def main(dk=64, dv=32, lengths=(1, 7, 64, 100, 300)):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as hf_chunk

    forms = {
        "ours sequential": lambda kw: gated_delta_rule_ref(**kw),
        "ours chunked": lambda kw: gated_delta_rule_chunked(**kw, chunk_size=64),
        "transformers chunk": lambda kw: hf_chunk(
            kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], chunk_size=64, initial_state=kw["initial_state"],
            output_final_state=True, use_qk_l2norm_in_kernel=True),
    }
    import onnxruntime as ort

    from scan_export.onnx.gated_delta_model import GatedDeltaModelSpec, build_gated_delta_model

    for form in ("sequential", "chunked"):
        sess = ort.InferenceSession(build_gated_delta_model(GatedDeltaModelSpec(form=form)).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        forms[f"onnx {form}"] = lambda kw, sess=sess: [torch.from_numpy(a) for a in sess.run(
            None, {n: t.numpy() for n, t in kw.items()})]
    import sys as _sys
    _sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_gated_delta import contrib_model, native_model

    native = ort.InferenceSession(native_model(4, dk, dv).SerializeToString(), providers=["CPUExecutionProvider"])

    def run_native(kw):  # its GQA shares k/v among queries, GDN's q/k among values: expand q, k first
        feeds = {n: (t.repeat_interleave(2, dim=2) if n in ("q", "k") else t).numpy() for n, t in kw.items()}
        return [torch.from_numpy(a) for a in native.run(None, feeds)]

    forms["onnxruntime LinearAttention"] = run_native
    contrib = ort.InferenceSession(contrib_model(2, 4, dk, dv).SerializeToString(), providers=["CPUExecutionProvider"])
    forms["onnxruntime com.microsoft GatedDeltaNet"] = lambda kw: [torch.from_numpy(a) for a in contrib.run(
        None, {n: t.numpy() for n, t in kw.items()})]
    print(f"dk={dk} dv={dv} b=2 hk=2 h=4, l in {lengths}; worst over lengths: o / final state")
    print("| regime | " + " | ".join(forms) + " |")
    print("|---" * (len(forms) + 1) + "|")
    for regime in GDN_REGIMES:
        worst = {n: [0.0, 0.0] for n in forms}
        for l in lengths:
            kw = make_gdn_inputs(regime, 2, l, 2, 4, dk, dv, seed=l)
            o_ref, s_ref = gated_delta_rule_ref(**{n: t.double() for n, t in kw.items()})
            for name, fn in forms.items():
                o, s = fn(kw)
                worst[name][0] = max(worst[name][0], rel(o, o_ref))
                worst[name][1] = max(worst[name][1], rel(s, s_ref))
        print(f"| {regime} | " + " | ".join(f"{a:.1e} / {b:.1e}" for a, b in worst.values()) + " |")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
