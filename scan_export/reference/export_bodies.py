"""What our ops become inside a plain `torch.onnx.export(dynamo=True)`: torch ops and torch's scan
higher-order op, which the exporter turns into ONNX Scan by itself (its torchlib `higher_order_scan`).

custom_ops.py routes here while `torch.compiler.is_exporting()` (unless scan_export.onnx.export asked
to keep the opaque custom nodes, which it lowers itself). Each body mirrors the ONNX lowering's
layout (onnx/lowering/), so the two routes run the same arithmetic and agree to rounding:
  selective scan: one scan over time, h: (b, g, n, hd), seven ops per step (lowering/selective_scan.py)
  SSD scan:       one scan over chunks of T = min(l, chunk_size), the state (b, h, p, n) carried
                  (lowering/ssd.py, which takes a one-step branch for l = 1 instead)
  causal conv:    reference.conv as is (slices, no loop over time)
Glossary as in reference/selective_scan.py and reference/ssd.py; every dimension stays symbolic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# torch's scan higher-order op, the loop primitive of torch.export (a prototype API, not yet
# re-exported as torch.scan); tests/test_plain_export.py fails loudly if a torch upgrade moves it.
# We call the operator itself, not its wrapper `torch._higher_order_ops.scan`: see _detached_scan.
from torch._higher_order_ops.scan import scan_op as _scan_op

from .ssd import reverse_exclusive_cumsum
from .validate import compute_dtype
from ..errors import ScanExportError


def _detached_scan(step, init, xs, consts=()):
    """torch's scan HOP: step(h, xs_t, consts) -> (new h, y_t), over dim 0 of every xs -> (h, ys).

    The operator, called directly, is traced by the export's own make_fx tracer with the tensors
    as they are. The wrapper `scan()` instead runs it under torch.compile, whose cache entry for
    the wrapper's one code object outlives the export: a later export in the same process found
    it, checked its guards (the first export's sizes) against its own symbolic sizes, and so
    specialized them ("tracing inferred a static shape of 40 for dimension inputs['u'].shape[2]",
    cured only by torch._dynamo.reset()); and that compile re-traced every size-1 axis as a
    symbol (the exporter sets backed_size_oblivious), which broke d_state = 1 and static exports.

    step's tensors come in explicitly (consts, as the operator's additional inputs), never as
    closures: a subgraph traced by make_fx does not lift a captured outer tensor. Everything is fed
    contiguous and detached: views with symbolic strides fail the body's tracing ("vr must not be
    None for symbol s27"), and tensors that require grad (any parameter's descendant) take scan's
    autograd path, which hands the fake kernel a SymInt as a step output. An export is inference
    anyway; in the ONNX graph both are no-ops."""
    n_xs = len(xs)

    def combine(h, *rest):  # the operator's calling convention: (*carry, *xs_t, *additional_inputs)
        return step(h, list(rest[:n_xs]), list(rest[n_xs:]))

    init = init.detach().contiguous()
    xs = [x.detach().contiguous() for x in xs]
    consts = tuple(c.detach().contiguous() for c in consts)
    h, ys = _scan_op(combine, [init], xs, consts)
    return h, ys


def _as_carry(h):
    """A scan step's new carry with the init's strides: contiguous, size-1 axes included.

    The scan requires the carry's metadata to equal the init's, strides too. Broadcasting gives a
    size-1 axis of the result (static batch 1 with d_state = 1 or g = 1) whatever stride it likes,
    e.g. (32, 32, 1, 1) for the init's (32, 32, 32, 1) at (1, 1, 1, 32); .contiguous() leaves
    such strides as they are (the tensor counts as contiguous), a contiguous-format clone does
    not. The clone is no node in the ONNX graph."""
    return h.clone(memory_format=torch.contiguous_format)


# exp(−60) = 9e-27 of the previous state is invisible in float32 and float64; the floor keeps
# onnxruntime's Exp off its denormal slow path (the same floor as the ONNX lowering's).
LOG_DECAY_MIN = -60.0


def softplus_compensated(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = relu(x) + log1p(exp(−|x|)), log1p(t) = log(u) − ((u − 1) − t)/u with u = 1 + t.

    F.softplus would export as onnxruntime's Softplus (a scalar kernel, no float64) and torch.log1p
    as Log(1 + t), which loses a small Δ's relative precision (3e-5 at Δ = 1e-3); the correction
    term restores it. The same form as the ONNX lowering's softplus."""
    t = torch.exp(torch.clamp_min(-x.abs(), -80.0))
    u = t + 1.0
    return torch.relu(x) + (torch.log(u) - ((u - 1.0) - t) / u)


def selective_scan_body(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                        delta_softplus=False):
    """selective_scan_fn's arithmetic as torch ops + one scan over time -> (out, last_state).

    u, delta, z: (b, d, l)  A: (d, n)  B, C each (d, n) fixed | (b, n, l) | (b, g, n, l)
    The state is (b, g, n, hd), g the groups of the input-dependent B/C (1 when both are fixed)."""
    dtype_in, f = u.dtype, compute_dtype(u)
    d, n = A.shape
    uf = u.to(f)
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = softplus_compensated(dt)
    # Fixed B and C are (d, n) matrices: one group of all channels then, with B and C transposed
    # to (1, n, d). (One group per channel would leave a size-1 axis in the scanned tensors, which
    # torch's scan traces as symbolic: the carry would not keep its shape.)
    varying = next((x for x in (B, C) if x.dim() > 2), None)
    g = varying.shape[1] if varying is not None and varying.dim() == 4 else 1
    hd = d // g

    def per_step(x):  # (b, d, l) -> (l, b, g, 1, hd)
        return x.permute(2, 0, 1).unflatten(2, (g, hd)).unsqueeze(3)

    def time_major(x):  # (b, [g,] n, l) -> (l, b, g, n)
        x = x.to(f)
        return x.permute(3, 0, 1, 2) if x.dim() == 4 else x.permute(2, 0, 1).unsqueeze(2)

    def fixed(x):  # (d, n) -> (g, n, hd), contiguous: the scan wants its carry's strides unchanged
        return x.to(f).reshape(g, hd, n).transpose(1, 2).contiguous()

    A_g = fixed(A).detach()
    xs = [per_step(dt), per_step(dt * uf)]
    if B.dim() > 2:
        xs.append(time_major(B).unsqueeze(4))  # (l, b, g, n, 1)
    if C.dim() > 2:
        xs.append(time_major(C).unsqueeze(3))  # (l, b, g, 1, n)
    B_fixed = fixed(B).detach() if B.dim() == 2 else None
    C_fixed = fixed(C).detach() if C.dim() == 2 else None
    if initial_state is not None:
        h0 = initial_state.to(f).unflatten(1, (g, hd)).transpose(2, 3).contiguous()
    else:
        h0 = uf.new_zeros(uf.shape[0], g, n, hd)

    # maximum with a tensor exports as Max; clamp_min exports as Clip, 8% slower per step in
    # onnxruntime (measured on the whole scan at B1·D1536·L2048).
    floor = torch.tensor(LOG_DECAY_MIN, dtype=f, device=u.device)

    B_is_fixed, C_is_fixed = B_fixed is not None, C_fixed is not None
    consts = [A_g, floor] + [x for x in (B_fixed, C_fixed) if x is not None]

    def step(h, xs_t, consts_t):  # the tensors come in as arguments (see _detached_scan)
        dt_t, du_t, *varying_bc = xs_t
        A_t, floor_t, *fixed_bc = consts_t
        B_t = (fixed_bc if B_is_fixed else varying_bc).pop(0)
        h = _as_carry(torch.exp(torch.maximum(A_t * dt_t, floor_t)) * h + B_t * du_t)  # (b, g, n, hd)
        if C_is_fixed:
            y_t = (fixed_bc.pop(0) * h).sum(2, keepdim=True)  # (b, g, 1, hd)
        else:
            y_t = varying_bc.pop(0) @ h
        return h, y_t

    h, ys = _detached_scan(step, h0, xs, consts)  # ys: (l, b, g, 1, hd)
    y = ys.flatten(2).permute(1, 2, 0)  # (b, d, l)
    if D is not None:
        y = y + uf * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype_in), h.transpose(2, 3).flatten(1, 2)  # last_state: (b, d, n)


# A step's log-decay where a packed sequence starts (seq_idx changes): exp of it, and of every
# cumsum through it, is exactly 0, so no state crosses the boundary. Finite, not -inf: the masked
# cumsums multiply by 0, and -inf * 0 is NaN.
RESET_LOG_DECAY = -1e30


def ssd_scan_body(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, chunk_size=64,
                  dt_softplus=False, dt_limit=(0.0, math.inf), seq_idx=None):
    """mamba_chunk_scan_combined's arithmetic as torch ops -> (y, final): one scan over chunks of
    min(l, chunk_size) (_ssd_chunk_scan; a decode step is one 1x1 chunk).

    x, z: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)  D: (h,) | (h, p)
    seq_idx: (b, l) integers, packed sequences."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScanExportError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype_in, f = x.dtype, compute_dtype(x)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, T = h // g, chunk_size
    xf = x.to(f)
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = softplus_compensated(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi < math.inf:
        dt = dt.clamp(min=lo, max=hi)
    a, xdt = dt * A.to(f), xf * dt.unsqueeze(-1)  # (b, l, h), (b, l, h, p)
    if seq_idx is not None:  # seq_idx: (b, l); the state restarts where it changes, and initial_states
        # belongs to sequence 0 (a row that starts with another id starts from zeros), as in mamba_ssm.
        starts = torch.cat([seq_idx[:, :1] != 0, seq_idx[:, 1:] != seq_idx[:, :-1]], dim=1)  # (b, l)
        a = torch.where(starts.unsqueeze(-1), torch.full_like(a, RESET_LOG_DECAY), a)
    s0 = initial_states.to(f) if initial_states is not None else xf.new_zeros(b, h, p, n)
    y, final = _ssd_chunk_scan(a, xdt, B.to(f), C.to(f), s0, g, r, T)
    if D is not None:
        Df = D.to(f)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype_in), final


def _ssd_chunk_scan(a, xdt, B, C, s0, g, r, chunk_size):
    """a: (b, l, h), xdt: (b, l, h, p), B, C: (b, l, g, n), s0: (b, h, p, n) -> (y: (b, l, h, p), final).

    Chunks of T = min(l, chunk_size): a decode step (l = 1) is one 1x1 chunk, not a padded chunk of
    64 (20x slower at 24 heads x 64 x 128). l is padded to nc·T with identity steps (a = 0, Δx = 0),
    then one scan over the chunks."""
    l = a.shape[1]
    T = torch.sym_min(l, chunk_size)
    pad = (T - l % T) % T

    def chunks(t):  # (b, l, ·, ·) -> (nc, b, ·, T, ·): pad the time axis, split it, chunks first
        t = F.pad(t, [0, 0] * (t.dim() - 2) + [0, pad])
        return t.unflatten(1, (-1, T)).movedim(1, 0).transpose(2, 3).contiguous()

    a_all = chunks(a.unsqueeze(-1)).squeeze(-1)  # (nc, b, h, T)
    x_all = chunks(xdt)  # (nc, b, h, T, p)
    B_all, C_all = chunks(B), chunks(C)  # (nc, b, g, T, n)
    ones = torch.ones(T, T, dtype=a.dtype, device=a.device)
    strictly_lower, causal = ones.tril(-1), ones.tril()  # [k, j]: k > j; [i, j]: j <= i

    def step(state, xs_t, consts):  # the tensors come in as arguments (see _detached_scan)
        a_c, x_c, B_c, C_c = xs_t
        strictly_lower, causal = consts
        # L[i, j] = exp(Σ_{j<k≤i} a_k): a masked cumsum down the rows, then the causal mask.
        L = torch.exp(torch.cumsum(a_c.unsqueeze(-1) * strictly_lower, dim=-2)) * causal  # (b, h, T, T)
        scores = C_c @ B_c.transpose(-1, -2)  # (b, g, T, T)
        x_g = x_c.unflatten(1, (g, r))  # (b, g, r, T, p)
        y_diag = (L.unflatten(1, (g, r)) * scores.unsqueeze(2)) @ x_g
        cs = torch.cumsum(a_c, dim=-1)  # (b, h, T)
        decay_in = torch.exp(cs).unflatten(1, (g, r)).unsqueeze(-1)  # (b, g, r, T, 1)
        s_g = state.unflatten(1, (g, r))  # (b, g, r, p, n)
        y_c = y_diag + (C_c.unsqueeze(2) @ s_g.transpose(-1, -2)) * decay_in  # (b, g, r, T, p)
        weights = torch.exp(reverse_exclusive_cumsum(a_c)).unflatten(1, (g, r)).unsqueeze(-1)
        added = (x_g * weights).transpose(-1, -2) @ B_c.unsqueeze(2)  # (b, g, r, p, n)
        total = torch.exp(cs[..., -1:]).unsqueeze(-1)  # (b, h, 1, 1)
        state = _as_carry(total * state + added.flatten(1, 2))
        return state, y_c.flatten(1, 2).transpose(1, 2)  # y: (b, T, h, p)

    final, ys = _detached_scan(step, s0, (a_all, x_all, B_all, C_all), (strictly_lower, causal))  # ys: (nc, b, T, h, p)
    return ys.movedim(0, 1).flatten(1, 2)[:, :l], final  # (b, l, h, p)
