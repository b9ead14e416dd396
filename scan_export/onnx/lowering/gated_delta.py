"""ONNX lowering of the Gated DeltaNet recurrence (portable: standard ops, opset >= 18).

Glossary and semantics as reference.gated_delta: b batch, l seqlen, hk key heads, h value heads
(r = h / hk), dk, dv, T chunk size, nc chunks; per value head S: (dk, dv),
    S ← exp(g)·S;  δ = β·(v − kᵀS);  S ← S + k ⊗ δ;  o = qᵀS
Common prologue (bulk, outside any loop): cast, q/k repeated over value heads, L2-normalised,
q·dk^-0.5. Then one of two forms, both the same graph for every l and batch:
  "sequential": one Scan over time. Per step one MatMul of [k; q] against the old state gives
     kᵀS and qᵀS together, so the output never re-reads the new state:
        δ = βv − αβ·kᵀS,  o = α·qᵀS + (q·k)·δ,  S' = α·S + k ⊗ δ      (α = exp(g))
  "chunked": the WY/UT form of reference.gated_delta.chunk_operands for all chunks at once
     (masked-cumsum segsum, recursive-doubling unit-lower inverse), then one Scan over chunks:
        [W2; Qd]·S (one MatMul),  U = W1 − W2·S,  o = Qd·S + intra·U,  S' = γ_T·S + Kendᵀ·U
     (l = 1, decode, takes the sequential form's one step instead, through an If.)
Every Exp takes a sum of g's (≤ 0), floored at LOG_DECAY_MIN: e^-60 = 9e-27 is invisible in
float32 and float64, and keeps onnxruntime's Exp off its slow denormal path (as the selective scan).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .graph_builder import GraphBuilder, value_info
from .selective_scan import NP_DTYPE, _scalar_tensor
from ...errors import ScanExportError
from ...reference.gated_delta import GDN_DEFAULT_CHUNK_SIZE, L2NORM_EPS, block_gather_index

GDN_FORMS = ("sequential", "chunked")
LOG_DECAY_MIN = -60.0


@dataclass(frozen=True)
class GatedDeltaConfig:
    io_dtype: int = TensorProto.FLOAT
    form: str = "sequential"
    chunk_size: int = GDN_DEFAULT_CHUNK_SIZE
    use_qk_l2norm: bool = True

    def __post_init__(self):
        if self.form not in GDN_FORMS:
            raise ScanExportError(f"form must be one of {GDN_FORMS}, got {self.form!r}")
        T = self.chunk_size
        if T < 1 or T & (T - 1):
            raise ScanExportError(f"chunk_size must be a power of 2 (the doubling inverse), got {T}")

    @property
    def compute_dtype(self) -> int:
        return TensorProto.DOUBLE if self.io_dtype == TensorProto.DOUBLE else TensorProto.FLOAT


def emit_gated_delta(gb: GraphBuilder, cfg: GatedDeltaConfig, q, k, v, g, beta, initial_state=None):
    """q, k: (b, l, hk, dk)  v: (b, l, h, dv)  g, beta: (b, l, h)  initial_state: (b, h, dk, dv) | None
    -> (o: (b, l, h, dv) in io dtype, final_state: (b, h, dk, dv) in compute dtype)."""
    f = cfg.compute_dtype
    fnp = NP_DTYPE[f]

    def to_f(t):
        return t if t is None or cfg.io_dtype == f else gb.op("Cast", t, to=f)

    q, k, v, g, beta, initial_state = map(to_f, (q, k, v, g, beta, initial_state))
    sq, sv = gb.op("Shape", q), gb.op("Shape", v)
    b_, l_, hk_, dk_ = (gb.op("Slice", sq, gb.ints(i), gb.ints(i + 1)) for i in range(4))
    h_, dv_ = (gb.op("Slice", sv, gb.ints(i), gb.ints(i + 1)) for i in (2, 3))
    r_ = gb.op("Div", h_, hk_)

    def per_value_head(t):  # (b, l, hk, dk) -> (b, l, h, dk), each key head serving r consecutive heads
        t = gb.op("Expand", gb.op("Unsqueeze", t, gb.ints(3)), gb.op("Concat", b_, l_, hk_, r_, dk_, axis=0))
        return gb.op("Reshape", t, gb.op("Concat", b_, l_, h_, dk_, axis=0))

    q, k = per_value_head(q), per_value_head(k)
    if cfg.use_qk_l2norm:
        eps = gb.const(L2NORM_EPS, fnp)
        q, k = (gb.op("Mul", t, gb.op("Reciprocal", gb.op("Sqrt", gb.op(
            "Add", gb.op("ReduceSum", gb.op("Mul", t, t), gb.ints(-1), keepdims=1), eps)))) for t in (q, k))
    q = gb.op("Div", q, gb.op("Sqrt", gb.op("Cast", dk_, to=f)))  # (b, l, h, dk)
    if initial_state is None:
        initial_state = gb.op("ConstantOfShape", gb.op("Concat", b_, h_, dk_, dv_, axis=0),
                              value=_scalar_tensor(0.0, fnp))
    dims = dict(b=b_, l=l_, h=h_, dk=dk_, dv=dv_)
    if cfg.form == "sequential":
        o, final = _emit_time_scan(gb, dims, q, k, v, g, beta, initial_state, f, fnp)
    else:  # a decode step (l = 1) takes the one-step Scan, not a chunk padded to T
        step = gb.child("gdn_one_step")
        o_s, S_s = _emit_time_scan(step, dims, q, k, v, g, beta, initial_state, f, fnp)
        chunked = gb.child("gdn_chunked")
        o_c, S_c = _emit_chunk_scan(chunked, dims, q, k, v, g, beta, initial_state, cfg.chunk_size, f, fnp)
        o, final = gb.op(
            "If", gb.op("Squeeze", gb.op("Equal", l_, gb.ints(1)), gb.ints(0)), n_out=2,
            then_branch=step.graph("gdn_decode_step", [], [value_info(o_s, f), value_info(S_s, f)]),
            else_branch=chunked.graph("gdn_chunk_scan", [], [value_info(o_c, f), value_info(S_c, f)]),
        )
    return (o if cfg.io_dtype == f else gb.op("Cast", o, to=cfg.io_dtype)), final


def _decay(gb, log_decay, fnp):
    return gb.op("Exp", gb.op("Max", log_decay, gb.const(LOG_DECAY_MIN, fnp)))


def _emit_time_scan(gb: GraphBuilder, dims, q, k, v, g, beta, S0, f, fnp):
    """One Scan over time; every scanned tensor is laid out time-first once, in the step's shape."""
    b_, l_, h_, dv_ = (dims[n] for n in ("b", "l", "h", "dv"))
    gate = lambda t: gb.op("Unsqueeze", gb.op("Transpose", t, perm=[1, 0, 2]), gb.ints(3, 4))  # noqa: E731  (l, b, h, 1, 1)
    alpha = gate(_decay(gb, g, fnp))
    beta_t = gate(beta)
    qk = gb.op("Unsqueeze", gb.op("Transpose", gb.op("ReduceSum", gb.op("Mul", q, k), gb.ints(-1), keepdims=0),
                                  perm=[1, 0, 2]), gb.ints(3, 4))  # (l, b, h, 1, 1)
    kq = gb.op("Transpose", gb.op("Concat", gb.op("Unsqueeze", k, gb.ints(3)), gb.op("Unsqueeze", q, gb.ints(3)),
                                  axis=3), perm=[1, 0, 2, 3, 4])  # (l, b, h, 2, dk)
    k_col = gb.op("Unsqueeze", gb.op("Transpose", k, perm=[1, 0, 2, 3]), gb.ints(4))  # (l, b, h, dk, 1)
    bv = gb.op("Unsqueeze", gb.op("Transpose", gb.op("Mul", v, gb.op("Unsqueeze", beta, gb.ints(3))),
                                  perm=[1, 0, 2, 3]), gb.ints(3))  # (l, b, h, 1, dv)
    ab = gb.op("Mul", alpha, beta_t)

    body = gb.child("gdn_step")
    S_in, a_t, ab_t, qk_t, kq_t, kc_t, bv_t = (body.name(n) for n in ("S_in", "alpha", "ab", "qk", "kq", "k_col", "bv"))
    kS, qS = body.op("Split", body.op("MatMul", kq_t, S_in), axis=2, num_outputs=2, n_out=2)  # (b, h, 1, dv) each
    delta = body.op("Sub", bv_t, body.op("Mul", ab_t, kS))
    o_t = body.op("Add", body.op("Mul", a_t, qS), body.op("Mul", qk_t, delta))  # (b, h, 1, dv)
    S_out = body.op("Add", body.op("Mul", a_t, S_in), body.op("Mul", kc_t, delta))  # (b, h, dk, dv)
    step = body.graph("gated_delta_step", [value_info(n, f) for n in (S_in, a_t, ab_t, qk_t, kq_t, kc_t, bv_t)],
                      [value_info(S_out, f), value_info(o_t, f)])
    final, o = gb.op("Scan", S0, alpha, ab, qk, kq, k_col, bv, n_out=2, body=step, num_scan_inputs=6)
    o = gb.op("Reshape", o, gb.op("Concat", l_, b_, h_, dv_, axis=0))  # (l, b, h, dv)
    return gb.op("Transpose", o, perm=[1, 0, 2, 3]), final


def _emit_unit_lower_inverse(gb: GraphBuilder, M, T, fnp):
    """M: (nc, b, h, T, T) unit lower triangular -> M⁻¹ by recursive doubling
    (reference.gated_delta.unit_lower_inverse): log2 T levels, each one Gather of the blocks below
    the diagonal (constant indices) and two batched MatMuls."""
    flat = gb.op("Reshape", M, gb.ints(0, 0, 0, T * T))
    inv = gb.op("ConstantOfShape", gb.op("Concat", gb.op("Slice", gb.op("Shape", M), gb.ints(0), gb.ints(3)),
                                         gb.ints(T, 1, 1), axis=0), value=_scalar_tensor(1.0, fnp))
    s = 1
    while s < T:
        nb = T // (2 * s)
        pair = gb.op("Reshape", inv, gb.ints(0, 0, 0, nb, 2, s, s))
        A_inv, B_inv = (gb.op("Squeeze", t, gb.ints(4)) for t in
                        gb.op("Split", pair, axis=4, num_outputs=2, n_out=2))  # (…, nb, s, s)
        C = gb.op("Gather", flat, gb.const(block_gather_index(T, s).numpy(), np.int64), axis=3)  # (…, nb, s, s)
        X = gb.op("Neg", gb.op("MatMul", gb.op("MatMul", B_inv, C), A_inv))
        zeros = gb.op("ConstantOfShape", gb.op("Shape", A_inv), value=_scalar_tensor(0.0, fnp))
        inv = gb.op("Concat", gb.op("Concat", A_inv, zeros, axis=-1), gb.op("Concat", X, B_inv, axis=-1), axis=-2)
        s *= 2
    return gb.op("Reshape", inv, gb.ints(0, 0, 0, T, T))


def _emit_chunk_scan(gb: GraphBuilder, dims, q, k, v, g, beta, S0, T, f, fnp):
    b_, l_, h_, dv_ = (dims[n] for n in ("b", "l", "h", "dv"))
    T_ = gb.ints(T)
    pad_ = gb.op("Mod", gb.op("Sub", T_, gb.op("Mod", l_, T_)), T_)
    lp_ = gb.op("Add", l_, pad_)
    nc_ = gb.op("Div", lp_, T_)
    tail = gb.op("Concat", gb.ints(0), pad_, axis=0)

    def split(t, vec):  # (b, l, h[, d]) -> (nc, b, h, T[, d]); padded steps are all zero: identities
        t = gb.op("Pad", t, tail, None, gb.ints(1))
        if vec:
            t = gb.op("Reshape", t, gb.op("Concat", b_, nc_, T_, h_, gb.ints(-1), axis=0))
            return gb.op("Transpose", t, perm=[1, 0, 3, 2, 4])
        t = gb.op("Reshape", t, gb.op("Concat", b_, nc_, T_, h_, axis=0))
        return gb.op("Transpose", t, perm=[1, 0, 3, 2])

    qc, kc, vc = (split(t, True) for t in (q, k, v))  # (nc, b, h, T, d)
    gc, bc = split(g, False), split(beta, False)  # (nc, b, h, T)

    ones = np.ones((T, T), dtype=fnp)
    strictly_lower = gb.const(np.tril(ones, -1), fnp)  # [k, j]: k > j
    causal = gb.const(np.tril(ones), fnp)
    seg = gb.op("CumSum", gb.op("Mul", gb.op("Unsqueeze", gc, gb.ints(-1)), strictly_lower), gb.const(-2, np.int64))
    Gam = gb.op("Mul", _decay(gb, seg, fnp), causal)  # Γ[i, j] = exp(Σ_{j<k≤i} g_k), j ≤ i
    gamma = gb.op("Unsqueeze", _decay(gb, gb.op("CumSum", gc, gb.const(-1, np.int64)), fnp), gb.ints(-1))  # (…, T, 1)
    to_end = _decay(gb, gb.op("CumSum", gc, gb.const(-1, np.int64), exclusive=1, reverse=1), fnp)  # Σ_{k>j} g_k
    beta_col = gb.op("Unsqueeze", bc, gb.ints(-1))
    kb = gb.op("Mul", kc, beta_col)
    kT = gb.op("Transpose", kc, perm=[0, 1, 2, 4, 3])
    M = gb.op("Add", gb.const(np.eye(T, dtype=fnp), fnp),
              gb.op("Mul", gb.op("MatMul", kb, kT), gb.op("Mul", Gam, strictly_lower)))
    Minv = _emit_unit_lower_inverse(gb, M, T, fnp)
    W1 = gb.op("MatMul", Minv, gb.op("Mul", vc, beta_col))  # (nc, b, h, T, dv)
    W2 = gb.op("MatMul", Minv, gb.op("Mul", kb, gamma))  # (nc, b, h, T, dk)
    WQ = gb.op("Concat", W2, gb.op("Mul", qc, gamma), axis=3)  # [W2; Qd]: (nc, b, h, 2T, dk)
    intra = gb.op("Mul", gb.op("MatMul", qc, kT), Gam)  # (nc, b, h, T, T)
    KendT = gb.op("Transpose", gb.op("Mul", kc, gb.op("Unsqueeze", to_end, gb.ints(-1))), perm=[0, 1, 2, 4, 3])
    decay = gb.op("Unsqueeze", gb.op("Gather", gamma, gb.const(T - 1, np.int64), axis=3), gb.ints(-1))  # (nc, b, h, 1, 1)

    body = gb.child("gdn_chunk")
    S_in, W1_t, WQ_t, in_t, Ke_t, d_t = (body.name(n) for n in ("S_in", "W1", "WQ", "intra", "KendT", "decay"))
    W2S, QS = body.op("Split", body.op("MatMul", WQ_t, S_in), axis=2, num_outputs=2, n_out=2)  # (b, h, T, dv) each
    U = body.op("Sub", W1_t, W2S)
    o_t = body.op("Add", QS, body.op("MatMul", in_t, U))
    S_out = body.op("Add", body.op("Mul", d_t, S_in), body.op("MatMul", Ke_t, U))
    step = body.graph("gated_delta_chunk", [value_info(n, f) for n in (S_in, W1_t, WQ_t, in_t, Ke_t, d_t)],
                      [value_info(S_out, f), value_info(o_t, f)])
    final, o = gb.op("Scan", S0, W1, WQ, intra, KendT, decay, n_out=2, body=step, num_scan_inputs=5)
    o = gb.op("Reshape", gb.op("Transpose", o, perm=[1, 0, 3, 2, 4]),
              gb.op("Concat", b_, lp_, h_, dv_, axis=0))  # (nc, b, h, T, dv) -> (b, nc·T, h, dv)
    return gb.op("Slice", o, gb.ints(0), l_, gb.ints(1)), final
