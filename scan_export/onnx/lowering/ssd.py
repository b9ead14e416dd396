"""ONNX lowering of the Mamba-2 SSD scan (portable: standard ops, opset >= 18).

Glossary: b batch, l seqlen, h heads, p headdim, g groups, r = h / g heads per group, n dstate,
T chunk size, nc chunks. Mirrors reference.ssd.ssd_scan_chunked:
  1. Δ = clamp(softplus(dt + dt_bias), dt_limit) (mamba clamps always; skipped where softplus makes
     the default (0, inf) a no-op); a = Δ·A (b, l, h); xΔ = x·Δ (b, l, h, p)
  2. l == 1 (decode): one recurrence step. Otherwise pad l to nc·T with a = 0, xΔ = 0 (identity
     steps) and Loop over chunks carrying the state (b, h, p, n):
       L = exp(masked CumSum of a)                       (b, h, T, T), never a difference of sums
       y = (L ∘ C·Bᵀ)·xΔ + exp(CumSum a)·(C·state)      two batched MatMuls per term
       state = exp(Σa)·state + (xΔ·exp(reverse exclusive CumSum a))ᵀ·B
  3. y + D·x, · silu(z), cast back once.
seq_idx (b, l) int, packed sequences: run ids S = CumSum(seq_idx changes) (edge-padded), and per
chunk the masks of reference.ssd.ssd_scan_chunked: scores of pairs in one run, the carried state for
positions still in the carried run, the carry when the chunk's last position is, and only the
ending run's contributions to the state passed on. state_round (an ONNX dtype, 0 = none) rounds the
state a chunk reads to the dtype mamba stores it in.
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
    state_round: int = 0  # ONNX dtype the states passed between chunks are stored in, when narrower; 0 = none

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
                  initial_states=None, seq_idx=None):
    """Appends the scan. Returns (y: (b, l, h, p) in io dtype, final_states: (b, h, p, n) compute dtype)."""
    if cfg.lowering == "native" and (seq_idx is not None or cfg.state_round):
        raise ScanExportError("the native lowering (LinearAttention) takes neither seq_idx nor a state_dtype narrower "
                              "than the compute dtype; use lowering='portable'")
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
    if lo > 0.0 or hi < float("inf") or (not cfg.dt_softplus and lo > -float("inf")):  # else a no-op
        dt = gb.op("Clip", dt, gb.const(max(lo, -np.finfo(fnp).max), fnp), gb.const(min(hi, np.finfo(fnp).max), fnp))
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

    runs = None if seq_idx is None else _emit_run_ids(gb, seq_idx, b_)
    stored = (lambda g, s: s) if not cfg.state_round else (  # noqa: E731
        lambda g, s: g.op("Cast", g.op("Cast", s, to=cfg.state_round), to=f))
    step = gb.child("ssd_step")
    y_step, s_step = _emit_step(step, dims, a, xdt, B, C, h0, runs, stored, f)
    chunked = gb.child("ssd_chunked")
    y_chunk, s_chunk = _emit_chunks(chunked, dims, a, xdt, B, C, h0, T, f, fnp, runs, stored)
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


def _emit_run_ids(gb: GraphBuilder, seq_idx, b_):
    """seq_idx: (b, l) int -> S: (b, l) int64, +1 wherever seq_idx changes (id 0 before position 0)."""
    s = gb.op("Cast", seq_idx, to=TensorProto.INT64)
    zero = gb.op("ConstantOfShape", gb.op("Concat", b_, gb.ints(1), axis=0),
                 value=_scalar_tensor(0, np.int64))  # (b, 1)
    prev = gb.op("Concat", zero, gb.op("Slice", s, gb.ints(0), gb.ints(-1), gb.ints(1)), axis=1)
    changed = gb.op("Cast", gb.op("Not", gb.op("Equal", s, prev)), to=TensorProto.INT64)
    return gb.op("CumSum", changed, gb.const(1, np.int64))


def _emit_step(gb: GraphBuilder, dims, a, xdt, B, C, state, runs, stored, f):
    """l == 1: state = exp(a)·state + xΔ ⊗ B; y = state·C. Returns (y: (b, 1, h, p), state).
    With run ids, a step that starts a sequence (S = 1) keeps none of the state."""
    b_, h_, p_, g_, n_, r_ = (dims[k] for k in "bhpgnr")
    decay = gb.op("Exp", gb.op("Reshape", a, gb.op("Concat", b_, h_, gb.ints(1, 1), axis=0)))  # (b, h, 1, 1)
    if runs is not None:
        keep = gb.op("Cast", gb.op("Equal", runs, gb.const(np.zeros((1, 1), np.int64), np.int64)), to=f)  # (b, 1)
        decay = gb.op("Mul", decay, gb.op("Unsqueeze", keep, gb.ints(2, 3)))
    xdt1 = gb.op("Reshape", xdt, gb.op("Concat", b_, g_, r_, p_, gb.ints(1), axis=0))  # (b, g, r, p, 1)
    B1 = gb.op("Reshape", B, gb.op("Concat", b_, g_, gb.ints(1, 1), n_, axis=0))  # (b, g, 1, 1, n)
    C1 = gb.op("Reshape", C, gb.op("Concat", b_, g_, gb.ints(1), n_, gb.ints(1), axis=0))  # (b, g, 1, n, 1)
    bghpn = gb.op("Concat", b_, h_, p_, n_, axis=0)
    added = gb.op("Reshape", gb.op("Mul", xdt1, B1), bghpn)
    read = stored(gb, state)  # y reads the incoming state as mamba stores it; the state passed on is exact
    new_state = gb.op("Add", gb.op("Mul", decay, state), added)
    state_for_y = new_state if read == state else gb.op("Add", gb.op("Mul", decay, read), added)
    state = new_state
    state_g = gb.op("Reshape", state_for_y, gb.op("Concat", b_, g_, r_, p_, n_, axis=0))  # (b, g, r, p, n)
    y = gb.op("MatMul", state_g, C1)  # (b, g, r, p, 1)
    return gb.op("Reshape", y, gb.op("Concat", b_, gb.ints(1), h_, p_, axis=0)), state


def _emit_chunks(gb: GraphBuilder, dims, a, xdt, B, C, h0, T, f, fnp, runs, stored):
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
    if runs is not None:  # padded steps continue the last run (edge), so they stay identity steps
        runs = gb.op("Pad", runs, tail, None, time_axis, mode="edge")
        runs_all = gb.op("Transpose", gb.op("Reshape", runs, gb.op("Concat", b_, nc_, T_, axis=0)), perm=[1, 0, 2])
        ends = gb.op("Gather", runs_all, gb.const(T - 1, np.int64), axis=2)  # (nc, b) run id at each chunk end
        zero_row = gb.op("ConstantOfShape", gb.op("Concat", gb.ints(1), b_, axis=0), value=_scalar_tensor(0, np.int64))
        prev_all = gb.op("Concat", zero_row, gb.op("Slice", ends, gb.ints(0), gb.ints(-1), gb.ints(0)), axis=0)  # (nc, b)

    ones = np.ones((T, T), dtype=fnp)
    strictly_lower = gb.const(np.tril(ones, -1), fnp)  # [k, j] = 1 where k > j
    causal = gb.const(np.tril(ones), fnp)  # [i, j] = 1 where j <= i

    body = gb.child("chunk")
    it, cond_in, s_in = body.name("iter"), body.name("cond_in"), body.name("state_in")  # state: (b, h, p, n)
    take = lambda t: body.op("Gather", t, it, axis=0)  # noqa: E731
    a_c, x_c, B_c, C_c = take(a_all), take(x_all), take(B_all), take(C_all)
    if runs is not None:
        s_c, s_prev = take(runs_all), body.op("Unsqueeze", take(prev_all), body.ints(1))  # (b, T), (b, 1)
        s_end = body.op("Slice", s_c, body.ints(-1), body.ints(INT64_MAX), body.ints(1))  # (b, 1)
        mask = lambda u, v: body.op("Cast", body.op("Equal", u, v), to=f)  # noqa: E731
        same_run = body.op("Unsqueeze", mask(body.op("Unsqueeze", s_c, body.ints(2)),
                                             body.op("Unsqueeze", s_c, body.ints(1))), body.ints(1))  # (b, 1, T, T)
        in_carried = body.op("Unsqueeze", mask(s_c, s_prev), body.ints(1))  # (b, 1, T)
        in_ending = body.op("Unsqueeze", mask(s_c, s_end), body.ints(1))  # (b, 1, T)
        keep_carry = body.op("Unsqueeze", mask(s_end, s_prev), body.ints(2, 3))  # (b, 1, 1, 1)
    bgr = lambda *rest: body.op("Concat", b_, g_, r_, *rest, axis=0)  # noqa: E731
    bh = lambda *rest: body.op("Concat", b_, h_, *rest, axis=0)  # noqa: E731
    T1 = body.ints(T)

    # L[i, j] = exp(Σ_{j<k≤i} a_k): a masked CumSum down the rows, then the causal mask.
    terms = body.op("Mul", body.op("Unsqueeze", a_c, body.ints(-1)), strictly_lower)  # (b, h, T[k], T[j])
    L = body.op("Mul", body.op("Exp", body.op("CumSum", terms, body.const(-2, np.int64))), causal)
    if runs is not None:
        L = body.op("Mul", L, same_run)
    scores = body.op("MatMul", C_c, body.op("Transpose", B_c, perm=[0, 1, 3, 2]))  # (b, g, T, T)
    M = body.op("Mul", body.op("Reshape", L, bgr(T1, T1)), body.op("Unsqueeze", scores, body.ints(2)))
    x_g = body.op("Reshape", x_c, bgr(T1, p_))  # (b, g, r, T, p)
    y_diag = body.op("MatMul", M, x_g)  # (b, g, r, T, p)

    cs = body.op("CumSum", a_c, body.const(-1, np.int64))  # (b, h, T) Σ_{k≤i} a_k
    decay_in = body.op("Exp", cs)
    if runs is not None:
        decay_in = body.op("Mul", decay_in, in_carried)
    decay_in = body.op("Reshape", decay_in, bgr(T1, body.ints(1)))  # (b, g, r, T, 1)
    s_g = body.op("Reshape", stored(body, s_in), bgr(p_, n_))  # (b, g, r, p, n), as mamba stores it
    C_g = body.op("Unsqueeze", C_c, body.ints(2))  # (b, g, 1, T, n)
    y_off = body.op("Mul", body.op("MatMul", C_g, body.op("Transpose", s_g, perm=[0, 1, 2, 4, 3])), decay_in)
    y_c = body.op("Add", y_diag, y_off)  # (b, g, r, T, p)

    to_end = body.op("CumSum", a_c, body.const(-1, np.int64), exclusive=1, reverse=1)  # Σ_{k>j} a_k
    weights = body.op("Exp", to_end)
    if runs is not None:
        weights = body.op("Mul", weights, in_ending)
    weights = body.op("Reshape", weights, bgr(T1, body.ints(1)))  # (b, g, r, T, 1)
    xw = body.op("Transpose", body.op("Mul", x_g, weights), perm=[0, 1, 2, 4, 3])  # (b, g, r, p, T)
    added = body.op("MatMul", xw, body.op("Unsqueeze", B_c, body.ints(2)))  # (b, g, r, p, n)
    total = body.op("Exp", body.op("Slice", cs, body.ints(-1), body.ints(INT64_MAX), body.ints(-1)))  # (b, h, 1)
    total = body.op("Unsqueeze", total, body.ints(-1))  # (b, h, 1, 1)
    if runs is not None:
        total = body.op("Mul", total, keep_carry)
    s_out = body.op("Add", body.op("Mul", total, s_in),
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
