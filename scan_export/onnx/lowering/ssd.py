"""ONNX lowering of the Mamba-2 SSD scan (portable: standard ops, opset >= 18).

Glossary: b batch, l seqlen, h heads, p headdim, g groups, r = h / g heads per group, n dstate,
T chunk size, nc chunks. Mirrors reference.ssd.ssd_scan_chunked:
  1. Δ = clamp(softplus(dt + dt_bias)); a = Δ·A (b, l, h); xΔ = x·Δ (b, l, h, p)
  2. l == 1 (decode): one recurrence step. Otherwise pad l to nc·T with a = 0, xΔ = 0 (identity
     steps) and Loop over chunks carrying the state (b, h, p, n):
       L = exp(masked CumSum of a)                       (b, h, T, T), never a difference of sums
       y = (L ∘ C·Bᵀ)·xΔ + exp(CumSum a)·(C·state)      two batched MatMuls per term
       state = exp(Σa)·state + (xΔ·exp(reverse exclusive CumSum a))ᵀ·B
  3. y + D·x, · silu(z), cast back once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .graph_builder import INT64_MAX, GraphBuilder, value_info
from .selective_scan import NP_DTYPE, _emit_softplus, _scalar_tensor
from ...errors import ScanExportError


LOWERINGS = ("portable", "native")
NATIVE_MIN_OPSET = 27


@dataclass(frozen=True)
class SSDConfig:
    io_dtype: int = TensorProto.FLOAT
    chunk_size: int = 64
    dt_softplus: bool = True
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    d_per_channel: bool = False  # D: (h, p) rather than (h,)
    lowering: str = "portable"  # "portable" (Loop, opset >= 18) | "native" (LinearAttention, opset >= 27)
    heads: int | None = None  # required by "native": LinearAttention takes head counts as attributes

    def __post_init__(self):
        if self.lowering not in LOWERINGS:
            raise ScanExportError(f"lowering must be one of {LOWERINGS}, got {self.lowering!r}")
        if self.lowering == "native" and not self.heads:
            raise ScanExportError("the native lowering needs a static head count (heads), since LinearAttention "
                             "takes q_num_heads/kv_num_heads as attributes")

    @property
    def compute_dtype(self) -> int:
        return TensorProto.DOUBLE if self.io_dtype == TensorProto.DOUBLE else TensorProto.FLOAT


def emit_ssd_scan(gb: GraphBuilder, cfg: SSDConfig, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                  initial_states=None):
    """Appends the scan. Returns (y: (b, l, h, p) in io dtype, final_states: (b, h, p, n) compute dtype)."""
    f = cfg.compute_dtype
    fnp = NP_DTYPE[f]
    T = cfg.chunk_size

    def to_f(v):
        return v if v is None else gb.op("Cast", v, to=f)

    x, dt, A, B, C, D, z, dt_bias, initial_states = map(to_f, (x, dt, A, B, C, D, z, dt_bias, initial_states))
    if dt_bias is not None:
        dt = gb.op("Add", dt, dt_bias)
    if cfg.dt_softplus:
        dt = _emit_softplus(gb, dt, f, fnp)
    lo, hi = cfg.dt_limit
    if lo > 0.0 or hi < float("inf"):
        dt = gb.op("Clip", dt, gb.const(lo, fnp), gb.const(min(hi, np.finfo(fnp).max), fnp))
    a = gb.op("Mul", dt, A)  # (b, l, h)
    xdt = gb.op("Mul", x, gb.op("Unsqueeze", dt, gb.ints(-1)))  # (b, l, h, p)

    sx = gb.op("Shape", x)
    b_, l_, h_, p_ = (gb.op("Slice", sx, gb.ints(k), gb.ints(k + 1)) for k in range(4))
    sB = gb.op("Shape", B)
    g_, n_ = (gb.op("Slice", sB, gb.ints(k), gb.ints(k + 1)) for k in (2, 3))
    r_ = gb.op("Div", h_, g_)
    dims = dict(b=b_, l=l_, h=h_, p=p_, g=g_, n=n_, r=r_)
    if cfg.lowering == "native":
        y, final = _emit_linear_attention(gb, cfg, dims, a, xdt, B, C, initial_states, f)
        return _finish(gb, cfg, y, final, x, D, z, f)
    if initial_states is not None:
        h0 = initial_states
    else:
        h0 = gb.op("ConstantOfShape", gb.op("Concat", b_, h_, p_, n_, axis=0), value=_scalar_tensor(0.0, fnp))

    step = gb.child("ssd_step")
    y_step, s_step = _emit_step(step, dims, a, xdt, B, C, h0)
    chunked = gb.child("ssd_chunked")
    y_chunk, s_chunk = _emit_chunks(chunked, dims, a, xdt, B, C, h0, T, f, fnp)
    y, final = gb.op(
        "If", gb.op("Squeeze", gb.op("Equal", l_, gb.ints(1)), gb.ints(0)), n_out=2,
        then_branch=step.graph("ssd_single_step", [], [value_info(y_step, f), value_info(s_step, f)]),
        else_branch=chunked.graph("ssd_chunk_loop", [], [value_info(y_chunk, f), value_info(s_chunk, f)]),
    )  # y: (b, l, h, p)
    return _finish(gb, cfg, y, final, x, D, z, f)


def _finish(gb, cfg, y, final, x, D, z, f):
    """y: (b, l, h, p) -> (y + D·x)·silu(z), cast back once."""
    if D is not None:
        D_b = D if cfg.d_per_channel else gb.op("Unsqueeze", D, gb.ints(-1))  # (h, p) or (h, 1)
        y = gb.op("Add", y, gb.op("Mul", x, D_b))
    if z is not None:
        y = gb.op("Mul", y, gb.op("Mul", z, gb.op("Sigmoid", z)))
    out = y if cfg.io_dtype == f else gb.op("Cast", y, to=cfg.io_dtype)
    return out, final


def _emit_linear_attention(gb: GraphBuilder, cfg: SSDConfig, dims, a, xdt, B, C, initial_states, f):
    """ONNX opset 27 LinearAttention(update_rule="gated") with q = C, k = B, v = Δ·x, decay = Δ·A:
    S_t = exp(a_t)·S_{t−1} + B_t ⊗ (Δx)_t, o_t = C_tᵀ·S_t, the SSD recurrence with S = hᵀ.
    Groups are expanded to heads: LinearAttention's grouping shares keys *and* values, SSD's only B/C."""
    b_, l_, h_, p_, g_, n_, r_ = (dims[k] for k in "blhpgnr")
    per_head = gb.op("Concat", b_, l_, g_, r_, n_, axis=0)

    def heads_of(t):  # (b, l, g, n) -> (b, l, h·n)
        t = gb.op("Expand", gb.op("Unsqueeze", t, gb.ints(3)), per_head)
        return gb.op("Reshape", t, gb.op("Concat", b_, l_, gb.ints(-1), axis=0))

    v = gb.op("Reshape", xdt, gb.op("Concat", b_, l_, gb.ints(-1), axis=0))  # (b, l, h·p)
    past = None if initial_states is None else gb.op("Transpose", initial_states, perm=[0, 1, 3, 2])  # (b, h, n, p)
    out, present = gb.op(
        "LinearAttention", heads_of(C), heads_of(B), v, past, a, n_out=2,
        update_rule="gated", q_num_heads=cfg.heads, kv_num_heads=cfg.heads, scale=1.0, chunk_size=cfg.chunk_size,
    )
    y = gb.op("Reshape", out, gb.op("Concat", b_, l_, h_, p_, axis=0))
    return y, gb.op("Transpose", present, perm=[0, 1, 3, 2])  # (b, h, p, n)


def _emit_step(gb: GraphBuilder, dims, a, xdt, B, C, state):
    """l == 1: state = exp(a)·state + xΔ ⊗ B; y = state·C. Returns (y: (b, 1, h, p), state)."""
    b_, h_, p_, g_, n_, r_ = (dims[k] for k in "bhpgnr")
    decay = gb.op("Exp", gb.op("Reshape", a, gb.op("Concat", b_, h_, gb.ints(1, 1), axis=0)))  # (b, h, 1, 1)
    xdt1 = gb.op("Reshape", xdt, gb.op("Concat", b_, g_, r_, p_, gb.ints(1), axis=0))  # (b, g, r, p, 1)
    B1 = gb.op("Reshape", B, gb.op("Concat", b_, g_, gb.ints(1, 1), n_, axis=0))  # (b, g, 1, 1, n)
    C1 = gb.op("Reshape", C, gb.op("Concat", b_, g_, gb.ints(1), n_, gb.ints(1), axis=0))  # (b, g, 1, n, 1)
    bghpn = gb.op("Concat", b_, h_, p_, n_, axis=0)
    state = gb.op("Add", gb.op("Mul", decay, state), gb.op("Reshape", gb.op("Mul", xdt1, B1), bghpn))
    state_g = gb.op("Reshape", state, gb.op("Concat", b_, g_, r_, p_, n_, axis=0))  # (b, g, r, p, n)
    y = gb.op("MatMul", state_g, C1)  # (b, g, r, p, 1)
    return gb.op("Reshape", y, gb.op("Concat", b_, gb.ints(1), h_, p_, axis=0)), state


def _emit_chunks(gb: GraphBuilder, dims, a, xdt, B, C, h0, T, f, fnp):
    b_, l_, h_, p_, g_, n_, r_ = (dims[k] for k in "blhpgnr")
    T_ = gb.ints(T)
    pad_ = gb.op("Mod", gb.op("Sub", T_, gb.op("Mod", l_, T_)), T_)
    lp_ = gb.op("Add", l_, pad_)
    nc_ = gb.op("Div", lp_, T_)
    tail = gb.op("Concat", gb.ints(0), pad_, axis=0)
    time_axis = gb.ints(1)

    def chunk_major(t, inner, perm):  # (b, l, *inner) -> chunked, time axis moved per perm
        t = gb.op("Pad", t, tail, None, time_axis)
        t = gb.op("Reshape", t, gb.op("Concat", b_, nc_, T_, *inner, axis=0))
        return gb.op("Transpose", t, perm=perm)

    a_all = chunk_major(a, [h_], [1, 0, 3, 2])  # (nc, b, h, T)
    x_all = chunk_major(xdt, [h_, p_], [1, 0, 3, 2, 4])  # (nc, b, h, T, p)
    B_all, C_all = (chunk_major(t, [g_, n_], [1, 0, 3, 2, 4]) for t in (B, C))  # (nc, b, g, T, n)

    ones = np.ones((T, T), dtype=fnp)
    strictly_lower = gb.const(np.tril(ones, -1), fnp)  # [k, j] = 1 where k > j
    causal = gb.const(np.tril(ones), fnp)  # [i, j] = 1 where j <= i

    body = gb.child("chunk")
    it, cond_in, s_in = body.name("iter"), body.name("cond_in"), body.name("state_in")  # state: (b, h, p, n)
    take = lambda t: body.op("Gather", t, it, axis=0)  # noqa: E731
    a_c, x_c, B_c, C_c = take(a_all), take(x_all), take(B_all), take(C_all)
    bgr = lambda *rest: body.op("Concat", b_, g_, r_, *rest, axis=0)  # noqa: E731
    bh = lambda *rest: body.op("Concat", b_, h_, *rest, axis=0)  # noqa: E731
    T1 = body.ints(T)

    # L[i, j] = exp(Σ_{j<k≤i} a_k): a masked CumSum down the rows, then the causal mask.
    terms = body.op("Mul", body.op("Unsqueeze", a_c, body.ints(-1)), strictly_lower)  # (b, h, T[k], T[j])
    L = body.op("Mul", body.op("Exp", body.op("CumSum", terms, body.const(-2, np.int64))), causal)
    scores = body.op("MatMul", C_c, body.op("Transpose", B_c, perm=[0, 1, 3, 2]))  # (b, g, T, T)
    M = body.op("Mul", body.op("Reshape", L, bgr(T1, T1)), body.op("Unsqueeze", scores, body.ints(2)))
    x_g = body.op("Reshape", x_c, bgr(T1, p_))  # (b, g, r, T, p)
    y_diag = body.op("MatMul", M, x_g)  # (b, g, r, T, p)

    cs = body.op("CumSum", a_c, body.const(-1, np.int64))  # (b, h, T) Σ_{k≤i} a_k
    decay_in = body.op("Reshape", body.op("Exp", cs), bgr(T1, body.ints(1)))  # (b, g, r, T, 1)
    s_g = body.op("Reshape", s_in, bgr(p_, n_))  # (b, g, r, p, n)
    C_g = body.op("Unsqueeze", C_c, body.ints(2))  # (b, g, 1, T, n)
    y_off = body.op("Mul", body.op("MatMul", C_g, body.op("Transpose", s_g, perm=[0, 1, 2, 4, 3])), decay_in)
    y_c = body.op("Add", y_diag, y_off)  # (b, g, r, T, p)

    to_end = body.op("CumSum", a_c, body.const(-1, np.int64), exclusive=1, reverse=1)  # Σ_{k>j} a_k
    weights = body.op("Reshape", body.op("Exp", to_end), bgr(T1, body.ints(1)))  # (b, g, r, T, 1)
    xw = body.op("Transpose", body.op("Mul", x_g, weights), perm=[0, 1, 2, 4, 3])  # (b, g, r, p, T)
    added = body.op("MatMul", xw, body.op("Unsqueeze", B_c, body.ints(2)))  # (b, g, r, p, n)
    total = body.op("Exp", body.op("Slice", cs, body.ints(-1), body.ints(INT64_MAX), body.ints(-1)))  # (b, h, 1)
    s_out = body.op("Add", body.op("Mul", body.op("Unsqueeze", total, body.ints(-1)), s_in),
                    body.op("Reshape", added, bh(p_, n_)))
    y_flat = body.op("Reshape", body.op("Transpose", y_c, perm=[0, 3, 1, 2, 4]), body.ints(-1))  # (b, T, g, r, p) flat
    cond_out = body.op("Identity", cond_in)
    body_graph = body.graph(
        "ssd_chunk",
        [value_info(it, TensorProto.INT64, []), value_info(cond_in, TensorProto.BOOL, []), value_info(s_in, f)],
        [value_info(cond_out, TensorProto.BOOL, []), value_info(s_out, f), value_info(y_flat, f)],
    )
    s_last, ys = gb.op("Loop", gb.op("Squeeze", nc_, gb.ints(0)), gb.const(True, np.bool_), h0,
                       n_out=2, body=body_graph)  # ys: (nc, b·T·h·p)
    y = gb.op("Reshape", ys, gb.op("Concat", nc_, b_, T_, h_, p_, axis=0))
    y = gb.op("Reshape", gb.op("Transpose", y, perm=[1, 0, 2, 3, 4]), gb.op("Concat", b_, lp_, h_, p_, axis=0))
    return gb.op("Slice", y, gb.ints(0), l_, gb.ints(1)), s_last  # (b, l, h, p)
