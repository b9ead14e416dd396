"""Mamba-1 selective scan: the sequential oracle, the chunked scan (differentiable; what the custom
op's backward recomputes), the sequential eager fast path, and the decode step.

Glossary (mamba_ssm / paper naming):
  b: batch   d: channels (d_inner)   l: seqlen   n: dstate (N)   g: groups of B/C   hd = d // g
  T: chunk size          t: position inside a chunk
  Δ (delta): step size   A: (d, n) continuous decay, usually negative
  h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·u_t          y_t = C_t·h_t + D·u_t   (then · silu(z_t))

The chunked scan derives in docs/derivation.md. Inside a chunk it takes one of two exact forms:
  * "cumsum/divide" (mamba-mini's form, re-referenced to the chunk midpoint), cheap but it overflows
    float32 once Λ = max |A|·ΣΔ over the chunk grows (docs/numerics.md: NaN past ~88 with an end reference);
  * "sub-chunked": the same cumsum/divide inside sub-chunks of 4 steps, with each step's
    log-decay clamped at −20, and the recurrence carrying state between sub-chunks; finite for
    every Λ at about the same cost.
Each chunk measures its own Λ and takes the whole-chunk form only below PLAIN_MAX_DECAY.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validate import ScanDims, check_scan_inputs, compute_dtype
from ..errors import ScanExportError

DEFAULT_CHUNK_SIZE = 16
# Largest chunk decay Λ for which the cumsum/divide form is used. With the midpoint reference its
# exponents stay within ±Λ/2 = ±20, far from float32's ±88; the exponent rounding error is then about
# (Λ/2)·eps ≈ 1.2e-6 relative, which keeps us inside the 1e-5 parity budget (measured in tests).
PLAIN_MAX_DECAY = 40.0
# Per-step log-decay floor of the large-decay form, per compute dtype: exp(−20) = 2e-9 of the
# previous state is below float32 resolution (exp(−40) = 4e-18 below float64's), so the clamp
# changes nothing visible and bounds every exponent.
STEP_LOG_DECAY_MIN = {"float32": -20.0, "float64": -40.0}


def _prepare_delta(delta, delta_bias, delta_softplus, f):
    """delta: (b, d, l) -> Δ in compute dtype f, with bias and softplus applied."""
    delta = delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _per_channel(x: torch.Tensor, dims: ScanDims, f) -> torch.Tensor:
    """B or C in any accepted layout -> (b | 1, d, n, l | 1), one row per channel."""
    x = x.to(f)
    if x.dim() == 2:  # fixed (d, n)
        return x[None, :, :, None]
    if x.dim() == 3:  # (b, n, l)
        return x[:, None]
    return x.repeat_interleave(dims.dim // dims.groups, dim=1)  # (b, g, n, l) -> (b, d, n, l)


def _finish(y, u, D, z, dtype_in, f):
    """y: (b, d, l) scan term -> out = (y + D·u) · silu(z), cast back once."""
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype_in)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):
    """Sequential selective scan with mamba_ssm's `selective_scan_fn` semantics.

    u, delta, z: (b, d, l)   A: (d, n)   B, C: (d, n) | (b, n, l) | (b, g, n, l)
    D, delta_bias: (d,)      initial_state: (b, d, n)  (our extension; zeros when None)
    Returns out: (b, d, l) in u.dtype, and last_state: (b, d, n) in the compute dtype
    (float32, or float64 for float64 inputs) when return_last_state.
    """
    dims = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in, f = u.dtype, compute_dtype(u)
    u = u.to(f)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, f)
    A = A.to(f)
    Bd, Cd = _per_channel(B, dims, f), _per_channel(C, dims, f)  # (b|1, d, n, l|1)
    deltaA = torch.exp(delta[..., None] * A[:, None, :])  # (b, d, l, n)
    deltaB_u = (delta * u)[..., None] * Bd.transpose(2, 3)  # (b, d, l, n)
    x = (
        initial_state.to(f)
        if initial_state is not None
        else u.new_zeros(dims.batch, dims.dim, dims.dstate)
    )  # (b, d, n)
    ys = []
    # unbind, not indexing: the backward of l index ops would write l full-size gradients (O(l²)).
    C_steps = Cd.unbind(-1) if Cd.shape[-1] > 1 else [Cd[..., 0]] * dims.seqlen  # each (b|1, d, n)
    for dA_i, dBu_i, c_i in zip(deltaA.unbind(2), deltaB_u.unbind(2), C_steps):
        x = dA_i * x + dBu_i
        ys.append((x * c_i).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    out = _finish(y, u, D, z, dtype_in, f)
    return (out, x) if return_last_state else out


# ---------------------------------------------------------------------------------------------
# Chunked scan. Layout inside a chunk: (b, g, hd, n, t), time last so cumulative ops run on -1.


def chunk_decay(A_g, S_end):
    """Λ: the largest |A|·ΣΔ over this chunk. A_g: (g, hd, n, 1), S_end: (b, g, hd, 1, 1)."""
    return (A_g.abs() * S_end).amax()


def chunk_states_plain(h, A_g, S, X):
    """All states of one chunk by cumsum/divide, referenced to the chunk midpoint.

    h: (b, g, hd, n) state entering the chunk    A_g: (g, hd, n, 1)
    S: (b, g, hd, 1, t) inclusive cumsum of Δ     X: (b, g, hd, n, t) = Δ·u·B
    h_t = E_t·(Σ_{i≤t} X_i / E_i + exp(A·S_mid)·h),  E_t = exp(A·(S_t − S_mid))
    Exact algebra; finite only while Λ/2 < ~88, so callers gate it on chunk_decay.
    """
    S_mid = 0.5 * S[..., -1:]  # (b, g, hd, 1, 1)
    E = torch.exp(A_g * (S - S_mid))  # (b, g, hd, n, t)
    carried = (h * torch.exp(A_g * S_mid)[..., 0])[..., None]  # (b, g, hd, n, 1)
    return E * (torch.cumsum(X / E, dim=-1) + carried)


def subchunk_size(chunk_size: int) -> int:
    """Sub-chunk length for the large-decay form: the largest of 4, 2, 1 dividing the chunk.

    4 keeps exponents within ±40 (float32 rounding of the exponent ~2.4e-6 worst case, 1.1e-6
    measured) and needs 3 carry steps per chunk of 16; 2 was 20% slower for 1.7x less error."""
    return next(s for s in (4, 2, 1) if chunk_size % s == 0)


def chunk_states_subchunked(h, A_g, dt, X, sub: int = 4):
    """All states of one chunk for any decay: cumsum/divide inside sub-chunks of `sub` steps,
    carries between sub-chunks by the recurrence itself.

    dt: (b, g, hd, 1, t); other shapes as in chunk_states_plain; t % sub == 0.
    Each step's log-decay A·Δ is clamped at STEP_LOG_DECAY_MIN (float32: exp(−20) = 2e-9, the
    state it forgets is below float32 resolution), so a sub-chunk's exponents stay within ±sub·10
    (±40 for sub = 4) and no term can overflow, whatever Λ is.
    """
    *lead, t = X.shape
    m = t // sub
    log_a = (A_g * dt).clamp_min(STEP_LOG_DECAY_MIN[str(X.dtype).removeprefix("torch.")]).reshape(*lead, m, sub)  # (b, g, hd, n, m, sub)
    P = torch.cumsum(log_a, dim=-1)  # log-decay from each sub-chunk's start, in [−sub·20, 0]
    E = torch.exp(P - 0.5 * P[..., -1:])  # midpoint reference: within e^{±sub·10}
    local = E * torch.cumsum(X.reshape(*lead, m, sub) / E, dim=-1)  # states from a zero start
    decay_end, local_end = torch.exp(P[..., -1]), local[..., -1]  # (b, g, hd, n, m)
    carries = []
    for j in range(m):  # state entering sub-chunk j
        carries.append(h)
        h = decay_end[..., j] * h + local_end[..., j]
    carried = torch.stack(carries, dim=-1)[..., None]  # (b, g, hd, n, m, 1)
    return (local + torch.exp(P) * carried).reshape(*lead, t)


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, chunk_size=DEFAULT_CHUNK_SIZE,
):
    """Chunked selective scan: same signature and result as selective_scan_ref, plus chunk_size.

    Loops over chunks of chunk_size steps; inside each chunk it uses cumulative ops only
    (see the module docstring for the two exact forms and when each is taken). Differentiable.
    """
    dims = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScanExportError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, d, l, n = dims.batch, dims.dim, dims.seqlen, dims.dstate
    dtype_in, f = u.dtype, compute_dtype(u)
    g = dims.groups or d  # both B and C fixed: one "group" per channel
    hd = d // g
    u = u.to(f)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, f)
    dt_g = dt.view(b, g, hd, 1, l)
    du_g = (dt * u).view(b, g, hd, 1, l)

    def grouped(x):  # -> (1, g, hd, n, 1) when fixed (one row per channel), else (b, g, 1, n, l)
        x = x.to(f)
        if x.dim() == 2:
            return x.reshape(1, g, hd, n, 1)
        return x.reshape(b, g, 1, n, l)

    B_g, C_g = grouped(B), grouped(C)
    A_g = A.to(f).view(g, hd, n, 1)
    h = (
        initial_state.to(f).view(b, g, hd, n)
        if initial_state is not None
        else u.new_zeros(b, g, hd, n)
    )
    ys = []
    # Chunks by split, not by slicing in the loop: a slice's backward writes a full-length gradient,
    # which made the backward O(l²/T) (4 s at l = 4096); split's backward is one concatenation.
    n_chunks = -(-l // chunk_size)  # every position, including l % T == 1

    def chunks(x):  # time-invariant (…, 1) tensors are reused by every chunk
        return x.split(chunk_size, dim=-1) if x.shape[-1] > 1 else [x] * n_chunks

    for dt_c, du_c, B_c, C_c in zip(chunks(dt_g), chunks(du_g), chunks(B_g), chunks(C_g)):
        S = torch.cumsum(dt_c, dim=-1)  # (b, g, hd, 1, t)
        X = du_c * B_c  # (b, g, hd, n, t)
        # The form choice reads data, which graph capture (torch.compile) cannot branch on;
        # there every chunk takes the always-finite form.
        if not torch.compiler.is_compiling() and chunk_decay(A_g, S[..., -1:]) < PLAIN_MAX_DECAY:
            H = chunk_states_plain(h, A_g, S, X)
        else:
            H = chunk_states_subchunked(h, A_g, dt_c, X, subchunk_size(X.shape[-1]))
        ys.append((H * C_c).sum(dim=3))  # (b, g, hd, t)
        h = H[..., -1]
    y = torch.cat(ys, dim=-1).reshape(b, d, l)
    out = _finish(y, u, D, z, dtype_in, f)
    return (out, h.reshape(b, d, n)) if return_last_state else out


def selective_state_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step with mamba_ssm's `selective_state_update` semantics, without mutation.

    state: (b, d, n)   x, dt, z: (b, d)   A: (d, n)   B, C: (b, n) | (b, g, n)   D, dt_bias: (d,)
    Returns y: (b, d) in x.dtype and new_state: (b, d, n) in state.dtype.
    Equal to selective_scan_ref on a length-1 sequence with initial_state=state.
    The functional form (traceable), named apart from `scan_export.selective_state_update`, mamba_ssm's in-place one
    (eager, per-head layouts too). Exported models decode with the scan op at seqlen 1 instead.
    """
    if not isinstance(state, torch.Tensor) or state.dim() != 3:
        got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ScanExportError(f"state must be rank 3 (batch, dim, dstate), got {got}")
    for name, v in (("x", x), ("dt", dt), ("z", z)):
        if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 2):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ScanExportError(f"{name} must be rank 2 (batch, dim), got {got}")
    seq = lambda v: None if v is None else v[..., None]  # (..., ) -> (..., 1): a length-1 sequence
    out, new_state = selective_scan_ref(
        seq(x), seq(dt), A, seq(B), seq(C), D=D, z=seq(z), delta_bias=dt_bias,
        delta_softplus=dt_softplus, return_last_state=True, initial_state=state,
    )
    return out[..., 0], new_state.to(state.dtype)


# ---------------------------------------------------------------------------------------------
# Eager fast path: the recurrence itself, one fused op per step.

# Steps whose per-step tensors (b, g, hd, n) are prepared at once: the exp(Δ·A) and Δ·u·B of a
# block are computed vectorized, then the loop runs one addcmul per step. 2^21 elements (8 MB
# float32 per tensor) keeps a block's two tensors inside a large L2/L3 while leaving the
# per-step work large enough that the loop's overhead does not show (benchmarks/eager_scan.py).
BLOCK_ELEMENTS = 1 << 21


def selective_scan_sequential(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):
    """selective_scan_ref's recurrence, for eager speed: same signature, semantics and result.

    Inference only (in-place writes into its own buffers; the custom op's backward recomputes
    with selective_scan_chunked). Per block of steps, time-major (t, b, g, hd, n):
      decay = exp(Δ·A), drive = Δ·u·B (vectorized), then h_t = drive_t + decay_t·h_{t−1} as one
      addcmul per step written over drive_t, so that drive ends up holding every state; then
      y = Σ_n h·C for the whole block. The same arithmetic as selective_scan_ref, step by step
      (no cumsum/divide), so it agrees with the sequential oracle to a few ulps.
    """
    dims = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, h = scan_sequential(dims, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, h) if return_last_state else out


def scan_sequential(dims: ScanDims, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """selective_scan_sequential on checked inputs (dims from check_scan_inputs) -> (out, last_state)."""
    b, d, l, n = dims.batch, dims.dim, dims.seqlen, dims.dstate
    dtype_in, f = u.dtype, compute_dtype(u)
    g = dims.groups or 1  # both B and C fixed: one group of all channels
    hd = d // g
    uf = u.to(f)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, f)

    def time_major(x):  # (b, d, l) -> (l, b, g, hd, 1), contiguous: each step's state is then one block
        return x.permute(2, 0, 1).contiguous().view(l, b, g, hd, 1)

    def per_step(x):  # B or C -> (l | 1, b | 1, g, hd | 1, n), broadcast against the state
        x = x.to(f)
        if x.dim() == 2:  # fixed (d, n)
            return x.reshape(1, 1, g, hd, n)
        if x.dim() == 3:  # (b, n, l)
            return x.permute(2, 0, 1).reshape(l, b, 1, 1, n)
        return x.permute(3, 0, 1, 2).unsqueeze(3)  # (b, g, n, l) -> (l, b, g, 1, n)

    dt_t, du_t = time_major(dt), time_major(dt * uf)
    A_g = A.to(f).reshape(g, hd, n)
    B_t, C_t = per_step(B), per_step(C)
    h = initial_state.to(f).reshape(b, g, hd, n) if initial_state is not None else None  # None: zeros
    block = max(1, min(l, BLOCK_ELEMENTS // max(1, b * d * n)))
    ys = []
    for start in range(0, l, block):
        stop = min(l, start + block)
        decay = torch.exp(dt_t[start:stop] * A_g)  # (t, b, g, hd, n)
        Bs = B_t if B_t.shape[0] == 1 else B_t[start:stop]
        states = du_t[start:stop] * Bs  # Δ·u·B: (t, b, g, hd, n), fresh, overwritten by the states
        for i in range(stop - start):
            h = states[i] if h is None else torch.addcmul(states[i], decay[i], h, out=states[i])
        Cs = C_t if C_t.shape[0] == 1 else C_t[start:stop]
        # y_t = Σ_n h_t·C_t -> (t, b, g, hd): a batched matmul for a large block with per-step C
        # (2x faster than multiply-and-sum at MambaIR's size), else multiply-and-sum (the matmul's
        # dispatch costs more than a small block's arithmetic).
        if Cs.shape[3] == 1 and states.numel() >= 1 << 16:
            ys.append((states @ Cs.transpose(-1, -2)).squeeze(-1))
        else:
            ys.append((states * Cs).sum(-1))
    y = (ys[0] if len(ys) == 1 else torch.cat(ys)).reshape(l, b, d).permute(1, 2, 0)  # (b, d, l)
    return _finish(y, uf, D, z, dtype_in, f), h.reshape(b, d, n)
