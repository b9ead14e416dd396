"""ONNX lowering of the Mamba-1 selective scan, in one of two forms.

Glossary: b batch, d channels, l seqlen, n dstate, g groups of B/C, hd = d // g, T chunk size,
nc = ceil(l / T) chunks, lp = nc·T padded length.

"sequential" (the default): one Scan over time, h = exp(Δ_t·A)·h + Δ_t·u_t·B_t, y_t = C_t·h,
  seven small ops per step on (b, g, n, hd). Every operand of a step stays in cache, so on CPU it
  beats the chunked form by 1.2–2.7x (docs/derivation.md §8 has the numbers); it is exact, like
  the float32 reference, for any decay, and l == 1 is simply one step.

"chunked" (mirrors reference.selective_scan_chunked): parallel inside each chunk, for runtimes
  where a step costs a kernel launch.
  1. Δ = softplus(delta + delta_bias); du = Δ·u                         (b, d, l)
  2. pad l to lp with Δ = 0, du = 0, B = C = 0 — exact: a zero step is the identity map, so T
     stays static and no position is dropped when l % T == 1.
  3. l == 1 (decode) takes a single-step branch; otherwise
     Loop i < nc, carrying h: (b, g, n, hd), scanning out y_i: (T, b, g, hd)
       S = CumSum(Δ_i) ; Λ = max |A|·S_end
       If Λ < PLAIN_MAX_DECAY: cumsum/divide around the chunk midpoint    (~10 passes)
       else:                   the same inside sub-chunks of 2, with each step's log-decay
                               clamped at −20 and the recurrence between sub-chunks  (~14 passes)
  4. y = unpad(y) + D·u, · silu(z); cast back to the input dtype once.
Both forms keep every dimension dynamic; the node count does not depend on l.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ...reference.selective_scan import DEFAULT_CHUNK_SIZE, PLAIN_MAX_DECAY, STEP_LOG_DECAY_MIN, subchunk_size
from ..targets import DEFAULT_SCAN_FORM, SCAN_FORMS
from .graph_builder import INT64_MAX, GraphBuilder, value_info
from ...errors import ScanExportError

BC_LAYOUTS = ("fixed", "variable", "grouped")  # (d, n) | (b, n, l) | (b, g, n, l)
# bc_layout names one layout for both B and C, or "B_LAYOUT,C_LAYOUT" when they differ (mamba_ssm
# accepts, e.g., a fixed B with an input-dependent C).
# The sequential form floors each step's log-decay at −60 before Exp. Below about −87 float32's exp
# returns denormals, and onnxruntime's Exp then runs ~17x slower (measured: 8 µs -> 135 µs for a
# (16, 1536) block); exp(−60) = 9e-27 of the previous state is invisible in float32 and float64.
SEQUENTIAL_LOG_DECAY_MIN = -60.0
NP_DTYPE = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}


@dataclass(frozen=True)
class SelectiveScanConfig:
    io_dtype: int = TensorProto.FLOAT  # element type of u, delta, z, B, C and out
    bc_layout: str = "grouped"  # "fixed" | "variable" | "grouped", or "B_LAYOUT,C_LAYOUT"
    delta_softplus: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE  # the chunked form's T
    form: str = DEFAULT_SCAN_FORM

    def __post_init__(self):
        parts = self.bc_layout.split(",")
        if len(parts) not in (1, 2) or any(p not in BC_LAYOUTS for p in parts):
            raise ScanExportError(f"bc_layout must be one of {BC_LAYOUTS} or two of them as 'B_LAYOUT,C_LAYOUT', "
                                  f"got {self.bc_layout!r}")
        if self.form not in SCAN_FORMS:
            raise ScanExportError(f"scan form must be one of {SCAN_FORMS}, got {self.form!r}")
        if self.chunk_size < 1:
            raise ScanExportError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def compute_dtype(self) -> int:
        return TensorProto.DOUBLE if self.io_dtype == TensorProto.DOUBLE else TensorProto.FLOAT

    @property
    def b_layout(self) -> str:
        return self.bc_layout.split(",")[0]

    @property
    def c_layout(self) -> str:
        return self.bc_layout.split(",")[-1]

    @property
    def group_kind(self) -> str:
        """How channels split into the groups the scan works on: "grouped" (g from B/C's shape),
        "one" (g = 1, B/C (b, n, l)), or "per_channel" (g = d, both B and C fixed)."""
        layouts = (self.b_layout, self.c_layout)
        return "grouped" if "grouped" in layouts else "one" if "variable" in layouts else "per_channel"


@dataclass(frozen=True)
class _Dims:
    """Dynamic sizes, each a 1-element int64 vector."""

    b: str
    d: str
    l: str
    n: str
    g: str
    hd: str
    g_B: str  # B's own group count when input-dependent (1 for (b, n, l)); unused when fixed
    g_C: str


def emit_selective_scan(
    gb: GraphBuilder, cfg: SelectiveScanConfig, u, delta, A, B, C,
    D=None, z=None, delta_bias=None, initial_state=None,
):
    """Appends the scan to gb. Arguments are value names (None for absent optional inputs).

    Returns (out: (b, d, l) in cfg.io_dtype, last_state: (b, d, n) in the compute dtype).
    """
    f = cfg.compute_dtype
    fnp = NP_DTYPE[f]

    def to_f(x):
        return x if x is None else gb.op("Cast", x, to=f)

    u, dt, A, B, C, D, z, delta_bias, initial_state = map(
        to_f, (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    # Work channels-last, (b, l, d): every later broadcast is then over the last axis. In a model
    # whose activations are (b, l, d) already, these transposes cancel against the model's own.
    u, dt, z = (x if x is None else gb.op("Transpose", x, perm=[0, 2, 1]) for x in (u, dt, z))

    # 1. Δ and Δ·u over the whole sequence.
    if delta_bias is not None:
        dt = gb.op("Add", dt, delta_bias)  # (b, l, d) + (d,)
    if cfg.delta_softplus:
        dt = _emit_softplus(gb, dt, f, fnp)
    du = gb.op("Mul", dt, u)  # (b, l, d)

    shape_u = gb.op("Shape", u)
    b_, l_ = (gb.op("Slice", shape_u, gb.ints(k), gb.ints(k + 1)) for k in range(2))
    # d and n from A, a weight: in an exported model the optimizer can then fold A's layout change.
    shape_A = gb.op("Shape", A)
    d_, n_ = (gb.op("Slice", shape_A, gb.ints(k), gb.ints(k + 1)) for k in range(2))
    grouped = B if cfg.b_layout == "grouped" else C
    if cfg.group_kind == "grouped":  # B and C have the same group count (validated in eager)
        g_ = gb.op("Slice", gb.op("Shape", grouped), gb.ints(1), gb.ints(2))
    elif cfg.group_kind == "one":
        g_ = gb.ints(1)
    else:
        g_ = d_  # both fixed (d, n): one group per channel
    hd_ = gb.op("Div", d_, g_)
    own_g = {"grouped": g_, "variable": gb.ints(1), "fixed": g_}
    dims = _Dims(b_, d_, l_, n_, g_, hd_, own_g[cfg.b_layout], own_g[cfg.c_layout])

    def per_group(x):  # a weight (d, n) -> (g, n, hd), the layout of the state
        return gb.op("Transpose", gb.op("Reshape", x, gb.op("Concat", g_, hd_, n_, axis=0)), perm=[0, 2, 1])

    def time_major_groups(x, layout):  # input-dependent B or C -> (b, l, g | 1, n); a fixed one -> (g, n, hd)
        if layout == "grouped":
            return gb.op("Transpose", x, perm=[0, 3, 1, 2])  # (b, g, n, l) -> (b, l, g, n)
        if layout == "variable":
            return gb.op("Unsqueeze", gb.op("Transpose", x, perm=[0, 2, 1]), gb.ints(2))  # (b, l, 1, n)
        return per_group(x)

    B, C = time_major_groups(B, cfg.b_layout), time_major_groups(C, cfg.c_layout)
    A_g = per_group(A)  # (g, n, hd)
    if initial_state is not None and cfg.group_kind == "one":  # g = 1: no shape arithmetic
        h0 = gb.op("Unsqueeze", gb.op("Transpose", initial_state, perm=[0, 2, 1]), gb.ints(1))  # (b, 1, n, d)
    elif initial_state is not None:
        h0 = gb.op("Reshape", initial_state, gb.op("Concat", b_, g_, hd_, n_, axis=0))
        h0 = gb.op("Transpose", h0, perm=[0, 1, 3, 2])  # (b, g, n, hd)
    else:
        h0 = gb.op("ConstantOfShape", gb.op("Concat", b_, g_, n_, hd_, axis=0), value=_scalar_tensor(0.0, fnp))

    if cfg.form == "sequential":  # l == 1 (decode) is simply one step
        y, h_last = _emit_time_scan(gb, cfg, dims, dt, du, A_g, B, C, h0)
    else:
        # One step (decode) skips the chunk machinery, which would pad it to a whole chunk.
        step = gb.child("step")
        y_step, h_step = _emit_single_step(step, cfg, dims, dt, du, A_g, B, C, h0)
        chunked = gb.child("chunked")
        y_chunked, h_chunked = _emit_chunk_loop(chunked, cfg, dims, dt, du, A_g, B, C, h0)
        y, h_last = gb.op(
            "If", gb.op("Squeeze", gb.op("Equal", l_, gb.ints(1)), gb.ints(0)), n_out=2,
            then_branch=step.graph("single_step", [], [value_info(y_step, f), value_info(h_step, f)]),
            else_branch=chunked.graph("chunk_loop", [], [value_info(y_chunked, f), value_info(h_chunked, f)]),
        )  # y: (b, l, d) scan term, h_last: (b, g, n, hd)

    # 3. Skip connection, gate, back to (b, d, l), cast back once.
    if D is not None:
        y = gb.op("Add", y, gb.op("Mul", u, D))
    if z is not None:
        y = gb.op("Mul", y, gb.op("Mul", z, gb.op("Sigmoid", z)))
    y = gb.op("Transpose", y, perm=[0, 2, 1])
    out = y if cfg.io_dtype == f else gb.op("Cast", y, to=cfg.io_dtype)
    if cfg.group_kind == "one":
        last_state = gb.op("Transpose", gb.op("Squeeze", h_last, gb.ints(1)), perm=[0, 2, 1])  # (b, d, n)
    else:
        h_last = gb.op("Transpose", h_last, perm=[0, 1, 3, 2])  # (b, g, hd, n)
        last_state = gb.op("Reshape", h_last, gb.op("Concat", b_, d_, n_, axis=0))  # (b, d, n)
    return out, last_state


def _emit_time_scan(gb: GraphBuilder, cfg: SelectiveScanConfig, dims: _Dims, dt, du, A_g, B, C, h0):
    """The sequential form: one ONNX Scan over time. Returns (y: (b, l, d), h_last: (b, g, n, hd)).

    The scanned tensors are laid out time-first, each once, in exactly the per-step shape the body
    consumes, so the body is seven ops and nothing (l, ·, n, ·)-sized is ever materialised. Shapes
    are constants wherever the layout fixes g, because a decode step pays for every op. (Scanning
    axis 1 directly would save the transposes, but onnx's ReferenceEvaluator only scans axis 0, and
    onnxruntime transposes internally anyway.)"""
    f = cfg.compute_dtype
    if cfg.group_kind == "one":
        step_shape = gb.ints(0, 0, 1, 1, -1)  # (l, b, g = 1, 1, hd = d)
    elif cfg.group_kind == "per_channel":
        step_shape = gb.ints(0, 0, -1, 1, 1)  # (l, b, g = d, 1, hd = 1)
    else:
        step_shape = gb.op("Concat", gb.ints(0, 0), dims.g, gb.ints(1, -1), axis=0)  # (l, b, g, 1, hd)
    dt_s, du_s = (gb.op("Reshape", gb.op("Transpose", x, perm=[1, 0, 2]), step_shape) for x in (dt, du))
    body = gb.child("step")
    h_in, dt_t, du_t = body.name("h_in"), body.name("dt_t"), body.name("du_t")
    step_inputs = [value_info(h_in, f), value_info(dt_t, f), value_info(du_t, f)]
    scanned = [dt_s, du_s]
    # A fixed B or C, (g, n, hd), is the same every step and read from the outer scope; an
    # input-dependent one, (b, l, g | 1, n), is scanned as (l, b, g | 1, n, 1) for B, (l, b, g | 1, 1, n) for C.
    if cfg.b_layout == "fixed":
        B_t = gb.op("Unsqueeze", B, gb.ints(0))  # (1, g, n, hd)
    else:
        scanned.append(gb.op("Unsqueeze", gb.op("Transpose", B, perm=[1, 0, 2, 3]), gb.ints(4)))
        B_t = body.name("B_t")  # (b, g | 1, n, 1)
        step_inputs.append(value_info(B_t, f))
    if cfg.c_layout == "fixed":
        C_t = gb.op("Unsqueeze", C, gb.ints(0))  # (1, g, n, hd)
    else:
        scanned.append(gb.op("Unsqueeze", gb.op("Transpose", C, perm=[1, 0, 2, 3]), gb.ints(3)))
        C_t = body.name("C_t")  # (b, g | 1, 1, n)
        step_inputs.append(value_info(C_t, f))
    log_decay = body.op("Max", body.op("Mul", A_g, dt_t), body.const(SEQUENTIAL_LOG_DECAY_MIN, NP_DTYPE[f]))
    decay = body.op("Exp", log_decay)  # (b, g, n, hd)
    h_out = body.op("Add", body.op("Mul", decay, h_in), body.op("Mul", B_t, du_t))
    if cfg.c_layout == "fixed":  # Σ_n C[g, n, hd]·h[b, g, n, hd]
        y_t = body.op("ReduceSum", body.op("Mul", C_t, h_out), body.ints(2), keepdims=1)  # (b, g, 1, hd)
    else:
        y_t = body.op("MatMul", C_t, h_out)  # (b, g, 1, hd)
    step = body.graph("selective_scan_step", step_inputs, [value_info(h_out, f), value_info(y_t, f)])
    h_last, y = gb.op("Scan", h0, *scanned, n_out=2, body=step, num_scan_inputs=len(scanned))  # y: (l, b, g, 1, hd)
    y = gb.op("Transpose", gb.op("Reshape", y, gb.ints(0, 0, -1)), perm=[1, 0, 2])
    return y, h_last


def _emit_single_step(gb: GraphBuilder, cfg: SelectiveScanConfig, dims: _Dims, dt, du, A_g, B, C, h0):
    """l == 1: h = exp(Δ·A)·h0 + Δ·u·B, y = Σ_n C·h. Returns (y: (b, 1, d), h: (b, g, n, hd))."""
    bg1h = gb.op("Concat", dims.b, dims.g, gb.ints(1), dims.hd, axis=0)
    dt1, du1 = (gb.op("Reshape", x, bg1h) for x in (dt, du))  # (b, 1, d) -> (b, g, 1, hd)

    def step_layout(x, layout, g_x):  # fixed (g, n, hd) -> (1, g, n, hd); (b, 1, g, n) -> (b, g, n, 1)
        if layout == "fixed":
            return gb.op("Unsqueeze", x, gb.ints(0))
        return gb.op("Reshape", x, gb.op("Concat", dims.b, g_x, dims.n, gb.ints(1), axis=0))

    B, C = step_layout(B, cfg.b_layout, dims.g_B), step_layout(C, cfg.c_layout, dims.g_C)
    h = gb.op("Add", gb.op("Mul", gb.op("Exp", gb.op("Mul", A_g, dt1)), h0), gb.op("Mul", du1, B))  # (b, g, n, hd)
    y = gb.op("ReduceSum", gb.op("Mul", h, C), gb.ints(2), keepdims=0)  # (b, g, hd)
    return gb.op("Reshape", y, gb.op("Concat", dims.b, dims.l, dims.d, axis=0)), h


def _emit_chunk_loop(gb: GraphBuilder, cfg: SelectiveScanConfig, dims: _Dims, dt, du, A_g, B, C, h0):
    """The Loop over chunks. Returns (y: (b, l, d), h_last: (b, g, n, hd))."""
    f = cfg.compute_dtype
    fnp = NP_DTYPE[f]
    T = cfg.chunk_size
    b_, d_, l_, n_, g_, hd_ = dims.b, dims.d, dims.l, dims.n, dims.g, dims.hd
    T_ = gb.ints(T)

    # Pad l to a multiple of T with identity steps, then lay chunks out time-first:
    # (nc, T, b, g, ·). CumSum over a leading axis adds contiguous slabs, ~4x faster in
    # onnxruntime than over a trailing axis of length T.
    pad_ = gb.op("Mod", gb.op("Sub", T_, gb.op("Mod", l_, T_)), T_)
    lp_ = gb.op("Add", l_, pad_)
    nc_ = gb.op("Div", lp_, T_)
    n_chunks = gb.op("Squeeze", nc_, gb.ints(0))  # scalar trip count
    tail_pads = gb.op("Concat", gb.ints(0), pad_, axis=0)
    time_axis = gb.ints(1)

    def chunk_major(x, last):  # (b, l, g·last) -> (nc, T, b, g, last)
        x = gb.op("Pad", x, tail_pads, None, time_axis)
        x = gb.op("Reshape", x, gb.op("Concat", b_, nc_, T_, g_, last, axis=0))
        return gb.op("Transpose", x, perm=[1, 2, 0, 3, 4])

    dt_all, du_all = (chunk_major(x, hd_) for x in (dt, du))  # (nc, T, b, g, hd)
    abs_A = gb.op("Abs", A_g)

    def chunk_major_bc(x, layout, g_x):  # fixed (g, n, hd) -> (1, 1, g, n, hd); else (nc, T, b, g | 1, n)
        if layout == "fixed":
            return gb.op("Unsqueeze", x, gb.ints(0, 1))
        x = gb.op("Pad", x, tail_pads, None, time_axis)
        x = gb.op("Reshape", x, gb.op("Concat", b_, nc_, T_, g_x, n_, axis=0))
        return gb.op("Transpose", x, perm=[1, 2, 0, 3, 4])

    B_all, C_all = chunk_major_bc(B, cfg.b_layout, dims.g_B), chunk_major_bc(C, cfg.c_layout, dims.g_C)

    # The Loop body. Chunk tensors are (T, b, g, n, hd): channels last, so every broadcast
    # multiplies a long hd-span by a scalar or a span, onnxruntime's fast paths.
    body = gb.child("chunk")
    it = body.name("iter")
    cond_in = body.name("cond_in")
    h_in = body.name("h_in")  # (b, g, n, hd)

    def chunk_of(x, unsqueeze_axis):  # (nc, T, b, g, m) -> (T, b, g, [1,] m [, 1])
        return body.op("Unsqueeze", body.op("Gather", x, it, axis=0), body.ints(unsqueeze_axis))

    dt_c = chunk_of(dt_all, 3)  # (T, b, g, 1, hd)
    du_c = chunk_of(du_all, 3)
    B_c = B_all if cfg.b_layout == "fixed" else chunk_of(B_all, 4)  # (T, b, g | 1, n, 1) or fixed (1, 1, g, n, hd)
    C_c = C_all if cfg.c_layout == "fixed" else chunk_of(C_all, 4)
    S = body.op("CumSum", dt_c, body.const(0, np.int64))  # (T, b, g, 1, hd) inclusive ΣΔ
    S_end = body.op("Slice", S, body.ints(-1), body.ints(INT64_MAX), body.ints(0))  # (1, b, g, 1, hd)
    decay = body.op("ReduceMax", body.op("Mul", abs_A, S_end), keepdims=0)  # Λ, scalar
    S_mid = body.op("Mul", S_end, body.const(0.5, fnp))

    # Each form reads the small per-chunk tensors and returns only y and the last state: the
    # (T, b, g, n, hd) states never cross the If, which would copy them.
    plain = body.child("plain")
    y_plain, h_plain = _emit_plain(plain, A_g, S, S_mid, du_c, B_c, C_c, h_in)
    stable = body.child("stable")
    y_stable, h_stable = _emit_subchunked(stable, cfg, dims, A_g, dt_c, du_c, B_c, C_c, h_in, T, fnp)
    y_c, h_out = body.op(
        "If", body.op("Less", decay, body.const(PLAIN_MAX_DECAY, fnp)), n_out=2,
        then_branch=plain.graph("plain_chunk", [], [value_info(y_plain, f), value_info(h_plain, f)]),
        else_branch=stable.graph("stable_chunk", [], [value_info(y_stable, f), value_info(h_stable, f)]),
    )  # y_c: (T, b, g, hd), h_out: (b, g, n, hd)
    # Scanned out flat: ONNX stacks scan outputs on a new axis, but onnx's ReferenceEvaluator
    # concatenates them (np.vstack); a 1-D output means the same (nc, T·b·g·hd) in both.
    y_flat = body.op("Reshape", y_c, body.ints(-1))
    cond_out = body.op("Identity", cond_in)
    body_graph = body.graph(
        "selective_scan_chunk",
        [value_info(it, TensorProto.INT64, []), value_info(cond_in, TensorProto.BOOL, []), value_info(h_in, f)],
        [value_info(cond_out, TensorProto.BOOL, []), value_info(h_out, f), value_info(y_flat, f)],
    )
    # cond is given although optional: the ReferenceEvaluator runs no iteration without it.
    keep_going = gb.const(True, np.bool_)
    h_last, y_chunks = gb.op("Loop", n_chunks, keep_going, h0, n_out=2, body=body_graph)  # (nc, T·b·g·hd)

    y = gb.op("Reshape", y_chunks, gb.op("Concat", nc_, T_, b_, g_, hd_, axis=0))  # (nc, T, b, g, hd)
    y = gb.op("Transpose", y, perm=[2, 0, 1, 3, 4])  # (b, nc, T, g, hd)
    y = gb.op("Reshape", y, gb.op("Concat", b_, lp_, d_, axis=0))  # (b, lp, d)
    return gb.op("Slice", y, gb.ints(0), l_, gb.ints(1)), h_last  # (b, l, d) unpadded


def _emit_softplus(gb: GraphBuilder, x, f, fnp):
    """softplus(x) = relu(x) + log1p(exp(−|x|)), with log1p(t) = log(u) − ((u − 1) − t)/u, u = 1 + t.

    The correction term recovers the rounding of 1 + t, so a small Δ keeps full relative precision
    (plain log(1 + t) loses it: 3e-5 relative at Δ = 1e-3). Against onnxruntime's Softplus kernel,
    measured: the same 3e-7 worst relative error in float32, 1.7x faster at (1, 512, 1536) and at
    (1, 1, 1536) (the kernel is scalar), and onnxruntime has no float64 Softplus at all. exp's
    argument is floored at −80 (e^−80 = 2e-35, below anything Δ can carry) to keep onnxruntime's
    Exp off its slow path for arguments below −88."""
    one = gb.const(1.0, fnp)
    t = gb.op("Exp", gb.op("Max", gb.op("Neg", gb.op("Abs", x)), gb.const(-80.0, fnp)))  # e^{−|x|} in (0, 1]
    u = gb.op("Add", t, one)
    rounding = gb.op("Div", gb.op("Sub", gb.op("Sub", u, one), t), u)
    log1p = gb.op("Sub", gb.op("Log", u), rounding)
    return gb.op("Add", gb.op("Relu", x), log1p)


def _scalar_tensor(value, np_dtype):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([value], dtype=np_dtype))


def _emit_plain(gb: GraphBuilder, A_g, S, S_mid, du_c, B_c, C_c, h):
    """h_t = E_t·(CumSum(X / E)_t + exp(A·S_mid)·h),  E_t = exp(A·(S_t − S_mid)); see the reference.
    Returns (y: (T, b, g, hd), last state: (b, g, n, hd))."""
    X = gb.op("Mul", du_c, B_c)  # (T, b, g, n, hd) Δ·u·B
    E = gb.op("Exp", gb.op("Mul", A_g, gb.op("Sub", S, S_mid)))  # (T, b, g, n, hd)
    cum = gb.op("CumSum", gb.op("Div", X, E), gb.const(0, np.int64))
    carried = gb.op("Mul", h, gb.op("Exp", gb.op("Mul", A_g, S_mid)))  # (1, b, g, n, hd)
    H = gb.op("Mul", E, gb.op("Add", cum, carried))
    y = gb.op("ReduceSum", gb.op("Mul", H, C_c), gb.ints(3), keepdims=0)  # (T, b, g, hd)
    return y, gb.op("Gather", H, gb.const(-1, np.int64), axis=0)


def _emit_subchunked(gb: GraphBuilder, cfg, dims, A_g, dt_c, du_c, B_c, C_c, h, T, fnp):
    """Any decay: cumsum/divide inside sub-chunks, the recurrence between them (see the reference's
    chunk_states_subchunked). Works in (m, sub, b, g, n, hd); reshapes only the small inputs.
    Returns (y: (T, b, g, hd), last state: (b, g, n, hd))."""
    sub = subchunk_size(T)
    m = T // sub
    ms = gb.ints(m, sub)

    def sub_layout(x, layout, g_x):  # fixed -> (1, 1, 1, g, n, hd); else (m, sub, b, g | 1, n, 1)
        if layout == "fixed":
            return gb.op("Unsqueeze", x, gb.ints(0))
        return gb.op("Reshape", x, gb.op("Concat", ms, dims.b, g_x, dims.n, gb.ints(1), axis=0))

    B_s, C_s = sub_layout(B_c, cfg.b_layout, dims.g_B), sub_layout(C_c, cfg.c_layout, dims.g_C)
    bg1h = gb.op("Concat", ms, dims.b, dims.g, gb.ints(1), dims.hd, axis=0)
    dt_s, du_s = (gb.op("Reshape", x, bg1h) for x in (dt_c, du_c))  # (m, sub, b, g, 1, hd)
    floor = STEP_LOG_DECAY_MIN[np.dtype(fnp).name]
    log_a = gb.op("Max", gb.op("Mul", A_g, dt_s), gb.const(floor, fnp))  # (m, sub, b, g, n, hd)
    P = gb.op("CumSum", log_a, gb.const(1, np.int64))  # log-decay from each sub-chunk's start
    last = (gb.ints(-1), gb.ints(INT64_MAX), gb.ints(1))
    P_end = gb.op("Slice", P, *last)  # (m, 1, b, g, n, hd)
    E = gb.op("Exp", gb.op("Sub", P, gb.op("Mul", P_end, gb.const(0.5, fnp))))
    X = gb.op("Mul", du_s, B_s)  # Δ·u·B
    local = gb.op("Mul", E, gb.op("CumSum", gb.op("Div", X, E), gb.const(1, np.int64)))
    decay_end = gb.op("Exp", gb.op("Squeeze", P_end, gb.ints(1)))  # (m, b, g, n, hd)
    local_end = gb.op("Squeeze", gb.op("Slice", local, *last), gb.ints(1))
    carries = []
    for j in range(m):  # the state entering sub-chunk j; m = T / sub is static
        carries.append(gb.op("Unsqueeze", h, gb.ints(0)))
        if j < m - 1:
            at = gb.const(j, np.int64)
            h = gb.op("Add", gb.op("Mul", gb.op("Gather", decay_end, at, axis=0), h), gb.op("Gather", local_end, at, axis=0))
    carried = gb.op("Unsqueeze", gb.op("Concat", *carries, axis=0), gb.ints(1))  # (m, 1, b, g, n, hd)
    H = gb.op("Add", local, gb.op("Mul", gb.op("Exp", P), carried))  # (m, sub, b, g, n, hd)
    y = gb.op("ReduceSum", gb.op("Mul", H, C_s), gb.ints(4), keepdims=0)  # (m, sub, b, g, hd)
    y = gb.op("Reshape", y, gb.op("Concat", gb.ints(T), dims.b, dims.g, dims.hd, axis=0))
    last_state = gb.op("Gather", gb.op("Gather", H, gb.const(-1, np.int64), axis=0), gb.const(-1, np.int64), axis=0)
    return y, last_state
