"""Mamba-2 state-space duality (SSD) scan: the sequential oracle, the chunked scan we export, and the
decode step, with the semantics of mamba_ssm's `mamba_chunk_scan_combined`.

Glossary: b batch, l seqlen, h heads, p headdim, g groups of B/C (h % g == 0), n dstate,
T chunk size, i/j positions inside a chunk.
  Δ = clamp(softplus(dt + dt_bias), dt_limit)      a_t = Δ_t·A  (one scalar per head, ≤ 0)
  h_t = exp(a_t)·h_{t−1} + Δ_t·x_t ⊗ B_t            y_t = h_t·C_t + D·x_t   (then · silu(z_t))
Shapes: x, z: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)
        D: (h,) or (h, p)  initial_states / final states: (b, h, p, n)

Inside a chunk (docs/derivation.md, "Mamba-2"): y = (L ∘ C·Bᵀ)·(Δx) + exp(cumsum a)·(C·h_in), with
L[i, j] = exp(Σ_{k=j+1..i} a_k) built by a masked CumSum (never by subtracting cumulative sums,
which loses |A|·ΣΔ·eps), and the state passed on with the decay to the chunk end taken from a
reverse exclusive CumSum. Every exponent is ≤ 0: nothing can overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ScanExportError

SSD_DEFAULT_CHUNK_SIZE = 64


def _shape(x):
    return f"{tuple(x.shape)} ({x.dtype})"


def check_ssd_inputs(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None):
    """-> (b, l, h, p, g, n); ValueError naming the argument, the expected layout and the shape."""
    def need(name, t, rank, layout):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ScanExportError(f"{name} must be rank {rank} {layout}, got {got}")
        if t.is_complex() or not t.is_floating_point():
            raise ScanExportError(f"{name} must be a real floating tensor, got {_shape(t)}")

    def same(name, t, want, layout):
        if tuple(t.shape) != tuple(want):
            raise ScanExportError(f"{name} must have shape {layout} = {tuple(want)}, got {_shape(t)}")

    need("x", x, 4, "(batch, seqlen, heads, headdim)")
    b, l, h, p = x.shape
    if l == 0:
        raise ScanExportError(f"x must have seqlen >= 1, got {_shape(x)}")
    need("dt", dt, 3, "(batch, seqlen, heads)")
    same("dt", dt, (b, l, h), "(batch, seqlen, heads)")
    need("A", A, 1, "(heads,)")
    same("A", A, (h,), "(heads,)")
    need("B", B, 4, "(batch, seqlen, groups, dstate)")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g:
        raise ScanExportError(f"B has {g} groups, but heads={h} is not divisible by groups; got {_shape(B)}")
    same("B", B, (b, l, g, n), "(batch, seqlen, groups, dstate)")
    need("C", C, 4, "(batch, seqlen, groups, dstate)")
    same("C", C, (b, l, g, n), "(batch, seqlen, groups, dstate)")
    if D is not None:
        need("D", D, D.dim() if D.dim() in (1, 2) else 1, "(heads,) or (heads, headdim)")
        same("D", D, (h,) if D.dim() == 1 else (h, p), "(heads,) or (heads, headdim)")
    if z is not None:
        need("z", z, 4, "(batch, seqlen, heads, headdim)")
        same("z", z, (b, l, h, p), "(batch, seqlen, heads, headdim)")
    if dt_bias is not None:
        need("dt_bias", dt_bias, 1, "(heads,)")
        same("dt_bias", dt_bias, (h,), "(heads,)")
    if initial_states is not None:
        need("initial_states", initial_states, 4, "(batch, heads, headdim, dstate)")
        same("initial_states", initial_states, (b, h, p, n), "(batch, heads, headdim, dstate)")
    for name, t in (("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != x.dtype:
            raise ScanExportError(f"{name} must have x's dtype {x.dtype}, got {_shape(t)}")
    return b, l, h, p, g, n


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f):
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi < math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt  # (b, l, h)


def _finish(y, x, D, z, dtype_in, f):
    """y: (b, l, h, p) -> (y + D·x)·silu(z), cast back once."""
    if D is not None:
        Df = D.to(f)
        y = y + x * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype_in)


def ssd_scan_ref(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None,
                 dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    """Sequential SSD scan (the oracle). chunk_size is accepted for signature parity and ignored."""
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    dtype_in, f = x.dtype, _compute_dtype(x)
    xf = x.to(f)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    Bh = B.to(f).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(f).repeat_interleave(h // g, dim=2)
    state = initial_states.to(f) if initial_states is not None else xf.new_zeros(b, h, p, n)
    decay = torch.exp(dt * A.to(f))  # (b, l, h)
    ys = []
    for t in range(l):
        state = decay[:, t, :, None, None] * state + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = _finish(torch.stack(ys, dim=1), xf, D, z, dtype_in, f)
    return (y, state) if return_final_states else y


def segsum_exp(a):
    """a: (..., t) log-decays -> L: (..., t, t), L[i, j] = exp(Σ_{k=j+1..i} a_k) for j ≤ i, else 0.

    Built by a masked cumulative sum, so each entry is a sum of its own terms only."""
    t = a.shape[-1]
    strictly_lower = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)  # [k, j]: k > j
    terms = a[..., :, None].expand(*a.shape, t).masked_fill(~strictly_lower, 0.0)  # [k, j] = a_k if k > j
    seg = terms.cumsum(dim=-2)  # [i, j] = Σ_{j<k≤i} a_k
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril()
    return torch.exp(seg.masked_fill(~causal, -math.inf))


def reverse_exclusive_cumsum(a):
    """out[j] = Σ_{k>j} a_k along the last axis, without subtracting cumulative sums."""
    inclusive_reversed = a.flip(-1).cumsum(-1).flip(-1)  # Σ_{k≥j}
    return F.pad(inclusive_reversed[..., 1:], (0, 1))


def ssd_scan_chunked(x, dt, A, B, C, chunk_size=SSD_DEFAULT_CHUNK_SIZE, D=None, z=None, dt_bias=None,
                     initial_states=None, dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    """Chunked SSD scan: same signature and result as ssd_scan_ref. Differentiable."""
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScanExportError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype_in, f = x.dtype, _compute_dtype(x)
    xf = x.to(f)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    a = (dt * A.to(f)).transpose(1, 2)  # (b, h, l) log-decay per step
    xdt = xf * dt[..., None]  # (b, l, h, p)
    Bf, Cf = B.to(f), C.to(f)
    rep = h // g
    state = initial_states.to(f) if initial_states is not None else xf.new_zeros(b, h, p, n)
    ys = []
    for start in range(0, l, chunk_size):
        sl = slice(start, min(start + chunk_size, l))
        a_c, xdt_c = a[..., sl], xdt[:, sl]  # (b, h, t), (b, t, h, p)
        B_c = Bf[:, sl].repeat_interleave(rep, dim=2)  # (b, t, h, n)
        C_c = Cf[:, sl].repeat_interleave(rep, dim=2)
        scores = torch.einsum("bihn,bjhn->bhij", C_c, B_c) * segsum_exp(a_c)  # (b, h, t, t)
        y_diag = torch.einsum("bhij,bjhp->bihp", scores, xdt_c)
        decay_in = torch.exp(a_c.cumsum(-1))  # (b, h, t): exp(Σ_{k≤i} a_k), decay of the carried state
        y_off = torch.einsum("bihn,bhpn->bihp", C_c, state) * decay_in.transpose(1, 2)[..., None]
        ys.append(y_diag + y_off)
        decay_to_end = torch.exp(reverse_exclusive_cumsum(a_c))  # (b, h, t)
        state = decay_in[..., -1, None, None] * state + torch.einsum(
            "bjhn,bjhp,bhj->bhpn", B_c, xdt_c, decay_to_end)
    y = _finish(torch.cat(ys, dim=1), xf, D, z, dtype_in, f)
    return (y, state) if return_final_states else y


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, math.inf)):
    """One Mamba-2 decode step, functional. state: (b, h, p, n)  x, z: (b, h, p)  dt: (b, h)
    B, C: (b, g, n). Returns (y: (b, h, p) in x.dtype, new_state in state.dtype)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ScanExportError(f"x must be rank 3 (batch, heads, headdim), got {_shape(x) if isinstance(x, torch.Tensor) else x!r}")
    seq = lambda t: None if t is None else t[:, None]  # noqa: E731  one-step sequence
    y, new_state = ssd_scan_ref(seq(x), seq(dt), A, seq(B), seq(C), None, D, seq(z), dt_bias, state,
                                dt_softplus, dt_limit, True)
    return y[:, 0], new_state.to(state.dtype)
