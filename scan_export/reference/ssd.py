"""Mamba-2 state-space duality (SSD) scan: the sequential oracle, the chunked scan we export, and the
decode step, with the semantics of mamba_ssm's `mamba_chunk_scan_combined`.

Glossary: b batch, l seqlen, h heads, p headdim, g groups of B/C (h % g == 0), n dstate,
T chunk size, i/j positions inside a chunk.
  Δ = clamp(softplus(dt + dt_bias), dt_limit)      a_t = Δ_t·A  (one scalar per head, ≤ 0)
  h_t = exp(a_t)·h_{t−1} + Δ_t·x_t ⊗ B_t            y_t = h_t·C_t + D·x_t   (then · silu(z_t))
Shapes: x, z: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)
        D: (h,) or (h, p)  initial_states / final states: (b, h, p, n)
        seq_idx: (b, l) int   cu_seqlens: (s + 1,) int   varlen states: (s, h, p, n)

mamba_ssm's conventions, from its Triton kernels (ssd_combined.py, ssd_chunk_state.py, ssd_state_passing.py):
  * Δ is always clamped to dt_limit, (0, inf) by default: a negative dt without softplus becomes 0.
  * seq_idx packs several sequences in a row: the state restarts from zero wherever seq_idx changes,
    and initial_states is the state before position 0 of sequence id 0 (a row starting with another id
    ignores it). mamba's kernels compare ids for equality, which is the same thing for the
    nondecreasing seq_idx packing produces; here a change of id is what resets, whatever the order.
  * return_varlen_states (batch 1, cu_seqlens given) returns, per packed sequence i, mamba's
    chunk_state_varlen: with c the chunk holding its last position e = cu_seqlens[i+1] − 1, the
    contributions of positions max(cu_seqlens[i], c·T) … e, plus the state entering chunk c when the
    sequence started before that chunk. With seq_idx marking the same sequences this is each
    sequence's own final state; without it, the state entering chunk c may carry earlier sequences,
    and initial_states counts only for a first sequence that crosses a chunk edge (both as in mamba).
  * final and varlen states come back in state_dtype, else C's dtype; the states passed between
    chunks are stored in that dtype, so a narrower one rounds what the next chunk reads (not the
    running state, which stays in the compute dtype). The oracle never rounds them.

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


def check_ssd_inputs(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                     cu_seqlens=None):
    """-> (b, l, h, p, g, n); ValueError naming the argument, the expected layout and the shape.
    cu_seqlens is checked only when given (callers pass it when return_varlen_states asks for it)."""
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
    for name, t, layout in (("seq_idx", seq_idx, "(batch, seqlen)"), ("cu_seqlens", cu_seqlens, "(sequences + 1,)")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ScanExportError(f"{name} must be an integer tensor {layout}, got {got}")
    if seq_idx is not None:
        same("seq_idx", seq_idx, (b, l), "(batch, seqlen)")
    if cu_seqlens is not None:
        if b != 1:
            raise ScanExportError(f"cu_seqlens (return_varlen_states) needs batch 1, as in mamba_ssm; got x {_shape(x)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ScanExportError(f"cu_seqlens must be rank 1 (sequences + 1,) with at least 2 entries, got {_shape(cu_seqlens)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or any(e <= s for s, e in zip(cu, cu[1:])) or cu[-1] > l:
            raise ScanExportError(f"cu_seqlens must rise strictly from 0 to at most seqlen={l}, got {cu}")
    return b, l, h, p, g, n


def segment_ids(seq_idx):
    """seq_idx: (b, l) -> (b, l) int64 that steps by one wherever seq_idx changes (position 0
    compares with id 0: the initial state belongs to sequence 0). Equal ids <=> same run."""
    s = seq_idx.to(torch.int64)
    prev = F.pad(s[:, :-1], (1, 0))  # id 0 before position 0
    return (s != prev).to(torch.int64).cumsum(-1)


def state_dtype_of(C, state_dtype):
    """mamba's dtype for final/varlen states and the states stored between chunks."""
    return state_dtype if state_dtype is not None else C.dtype


def rounding_dtype(C, state_dtype, f):
    """The dtype stored states are rounded to, or None when it holds the compute dtype f exactly."""
    sd = state_dtype_of(C, state_dtype)
    return sd if torch.finfo(sd).bits < torch.finfo(f).bits else None


def _results(y, final, varlen, return_final_states, return_varlen_states):
    """mamba_chunk_scan_combined's return conventions."""
    if not return_varlen_states:
        return (y, final) if return_final_states else y
    return (y, final, varlen) if return_final_states else (y, varlen)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f):
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    return dt.clamp(min=lo, max=hi)  # (b, l, h); mamba's kernel clamps always, (0, inf) by default


def _finish(y, x, D, z, dtype_in, f):
    """y: (b, l, h, p) -> (y + D·x)·silu(z), cast back once."""
    if D is not None:
        Df = D.to(f)
        y = y + x * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype_in)


def ssd_scan_ref(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                 cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False,
                 return_varlen_states=False, state_dtype=None):
    """Sequential SSD scan (the oracle), mamba_chunk_scan_combined's signature and returns.

    chunk_size matters only to return_varlen_states (mamba's varlen states depend on chunk edges)."""
    if return_varlen_states and (cu_seqlens is None or not isinstance(chunk_size, int)):
        raise ScanExportError("return_varlen_states needs cu_seqlens and an int chunk_size")
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                        cu_seqlens if return_varlen_states else None)
    dtype_in, f = x.dtype, _compute_dtype(x)
    xf = x.to(f)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    Bh = B.to(f).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(f).repeat_interleave(h // g, dim=2)
    state = initial_states.to(f) if initial_states is not None else xf.new_zeros(b, h, p, n)
    raw_decay = decay = torch.exp(dt * A.to(f))  # (b, l, h)
    added = (dt[..., None] * xf)[..., None] * Bh[:, :, :, None, :]  # (b, l, h, p, n)
    if seq_idx is not None:  # a new sequence starts from zero: its first step keeps none of the state
        seg = segment_ids(seq_idx)
        keep = (seg == F.pad(seg[:, :-1], (1, 0))).to(f)  # (b, l)
        decay = decay * keep[..., None]
    ys, states = [], []
    for decay_t, added_t, C_t in zip(decay.unbind(1), added.unbind(1), Ch.unbind(1)):
        state = decay_t[:, :, None, None] * state + added_t
        ys.append((state * C_t[:, :, None, :]).sum(-1))  # (b, h, p)
        states.append(state)
    y = _finish(torch.stack(ys, dim=1), xf, D, z, dtype_in, f)
    varlen = None
    if return_varlen_states:
        varlen = torch.stack([_varlen_state_ref(s, e, chunk_size, states, raw_decay[0], added[0])
                              for s, e in zip(cu_seqlens.tolist(), cu_seqlens[1:].tolist())])
    sd = state_dtype_of(C, state_dtype)
    return _results(y, state.to(sd), None if varlen is None else varlen.to(sd), return_final_states,
                    return_varlen_states)


def _varlen_state_ref(start, stop, T, states, decay, added):
    """mamba's chunk_state_varlen for one sequence [start, stop), sequentially (module docstring).
    decay: (l, h) without seq_idx resets, added: (l, h, p, n), states: the per-step states (with them)."""
    end = stop - 1
    chunk_start = end // T * T
    if start >= chunk_start:
        state, first = torch.zeros_like(added[0]), start
    else:  # the state entering the chunk, then every position of the chunk up to end
        state, first = states[chunk_start - 1][0], chunk_start
    for t in range(first, end + 1):  # inside [first, end] mamba's kernel applies no seq_idx reset
        state = decay[t][:, None, None] * state + added[t]
    return state


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
                     initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                     return_final_states=False, return_varlen_states=False, state_dtype=None):
    """Chunked SSD scan: same signature, results and return conventions as ssd_scan_ref. Differentiable.

    With seq_idx, a chunk masks what crosses a sequence start (module docstring): the intra-chunk
    scores of pairs in different runs, the carried state for positions after a start, the carry
    itself when the chunk holds a start. A narrower state dtype rounds the carried state where the
    next chunk reads it (y's off-diagonal term, varlen states), as mamba's stored chunk states are."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ScanExportError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if return_varlen_states and cu_seqlens is None:
        raise ScanExportError("return_varlen_states needs cu_seqlens, the (sequences + 1,) offsets of the packed sequences")
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                        cu_seqlens if return_varlen_states else None)
    dtype_in, f = x.dtype, _compute_dtype(x)
    round_to = rounding_dtype(C, state_dtype, f)
    stored = (lambda s: s) if round_to is None else (lambda s: s.to(round_to).to(f))  # noqa: E731
    xf = x.to(f)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    a = (dt * A.to(f)).transpose(1, 2)  # (b, h, l) log-decay per step
    xdt = xf * dt[..., None]  # (b, l, h, p)
    rep = h // g
    Bh, Ch = (t.to(f).repeat_interleave(rep, dim=2) for t in (B, C))  # (b, l, h, n)
    state = initial_states.to(f) if initial_states is not None else xf.new_zeros(b, h, p, n)
    # split, not slices in the loop: a slice's backward writes a full-length gradient (O(l²/T)).
    parts = [a.split(chunk_size, -1), xdt.split(chunk_size, 1), Bh.split(chunk_size, 1), Ch.split(chunk_size, 1)]
    if seq_idx is not None:
        parts.append(segment_ids(seq_idx).split(chunk_size, 1))
        prev_end = torch.zeros(b, dtype=torch.int64, device=x.device)  # run id before the chunk
    ys, entering = [], []
    for a_c, xdt_c, B_c, C_c, *seg in zip(*parts):  # (b, h, t), (b, t, h, p), (b, t, h, n) ×2, [(b, t)]
        entering.append(stored(state))
        L = segsum_exp(a_c)  # (b, h, t, t)
        decay_in = torch.exp(a_c.cumsum(-1))  # (b, h, t): exp(Σ_{k≤i} a_k), decay of the carried state
        decay_to_end = torch.exp(reverse_exclusive_cumsum(a_c))  # (b, h, t)
        carry = decay_in[..., -1]  # (b, h)
        if seg:
            s_c = seg[0]
            L = L * (s_c[:, :, None] == s_c[:, None, :])[:, None].to(f)  # pairs within one run
            decay_in = decay_in * (s_c == prev_end[:, None])[:, None].to(f)  # still in the carried run
            decay_to_end = decay_to_end * (s_c == s_c[:, -1:])[:, None].to(f)  # in the run that ends the chunk
            carry = carry * (s_c[:, -1] == prev_end)[:, None].to(f)
            prev_end = s_c[:, -1]
        scores = torch.einsum("bihn,bjhn->bhij", C_c, B_c) * L
        y_diag = torch.einsum("bhij,bjhp->bihp", scores, xdt_c)
        y_off = torch.einsum("bihn,bhpn->bihp", C_c, entering[-1]) * decay_in.transpose(1, 2)[..., None]
        ys.append(y_diag + y_off)
        state = carry[..., None, None] * state + torch.einsum("bjhn,bjhp,bhj->bhpn", B_c, xdt_c, decay_to_end)
    y = _finish(torch.cat(ys, dim=1), xf, D, z, dtype_in, f)
    sd = state_dtype_of(C, state_dtype)
    varlen = None
    if return_varlen_states:
        varlen = torch.stack([_varlen_state_chunked(s, e, chunk_size, entering, a[0], xdt[0], Bh[0])
                              for s, e in zip(cu_seqlens.tolist(), cu_seqlens[1:].tolist())]).to(sd)
    return _results(y, state.to(sd), varlen, return_final_states, return_varlen_states)


def _varlen_state_chunked(start, stop, T, entering, a, xdt, Bh):
    """mamba's chunk_state_varlen for the sequence [start, stop) of a batch-1 row.
    entering: states entering each chunk (stored dtype), a: (h, l), xdt: (l, h, p), Bh: (l, h, n)."""
    end = stop - 1
    c = end // T
    first = max(start, c * T)
    seg = slice(first, end + 1)
    weights = torch.exp(reverse_exclusive_cumsum(a[:, seg]).clamp(max=0.0))  # (h, m), mamba clamps at 0 too
    state = torch.einsum("jhn,jhp,hj->hpn", Bh[seg], xdt[seg], weights)
    if start < c * T:  # the sequence began before this chunk: add the state entering it, decayed to end
        state = state + torch.exp(a[:, c * T:end + 1].sum(-1))[:, None, None] * entering[c][0]
    return state


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, math.inf)):
    """One Mamba-2 decode step, functional. state: (b, h, p, n)  x, z: (b, h, p)  dt: (b, h)
    B, C: (b, g, n). Returns (y: (b, h, p) in x.dtype, new_state in state.dtype)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ScanExportError(f"x must be rank 3 (batch, heads, headdim), got {_shape(x) if isinstance(x, torch.Tensor) else x!r}")
    seq = lambda t: None if t is None else t[:, None]  # noqa: E731  one-step sequence
    y, new_state = ssd_scan_ref(seq(x), seq(dt), A, seq(B), seq(C), None, D, seq(z), dt_bias, state,
                                dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True,
                                state_dtype=state.dtype)
    return y[:, 0], new_state.to(state.dtype)
