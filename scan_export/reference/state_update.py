"""mamba_ssm's `selective_state_update` (mamba_ssm/ops/triton/selective_state_update.py): one decode step
that writes the new state into `state` in place and returns the output, for Mamba-1 and Mamba-2.

Glossary: b batch, h heads, p dim per head (Mamba-1: h = 1, p = d), n dstate, g groups (h % g == 0).
  state: (b, p, n) | (b, h, p, n)      x, dt, z: (b, p) | (b, h, p)      A: (p, n) | (h, p, n)
  B, C: (b, n) | (b, g, n)             D, dt_bias: (p,) | (h, p)         state_batch_indices: (b,) int
  Δ = softplus(dt + dt_bias) (if dt_softplus)      state ← state·exp(Δ·A) + Δ·B·x
  out = Σ_n state·C + D·x, then · silu(z)
Mamba-2 passes per-head A, dt, dt_bias, D expanded to (h, p, n) / (b, h, p) / (h, p) with stride 0;
they are ordinary broadcasts here. As in mamba's kernel: the new state feeds out before it is
stored (so a narrower state dtype rounds only what is kept), Δ is not clamped to any dt_limit,
row i uses state[state_batch_indices[i]], and a negative index is padding: out 0, no state written.

Which form each export uses: this in-place form is eager only (a drop-in for code written against
mamba_ssm). The functional steps `scan_export.reference.selective_state_step` (Mamba-1) and
`scan_export.reference.ssd.ssd_state_update` (Mamba-2) return (out, new_state) and can be traced;
the exported models (scan_export.onnx.model_export) decode with the scan ops at seqlen 1 instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ScanExportError


def _shape(t):
    return f"{tuple(t.shape)} ({t.dtype})" if isinstance(t, torch.Tensor) else type(t).__name__


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """mamba_ssm's selective_state_update: updates `state` in place, returns out (x's shape and dtype)."""
    if not isinstance(state, torch.Tensor) or state.dim() not in (3, 4):
        raise ScanExportError(f"state must be (batch, dim, dstate) or (batch, nheads, dim, dstate), got {_shape(state)}")
    has_heads = state.dim() == 4
    # Without heads, add mamba's unit head axis to every argument (its unsqueezes, one by one).
    st = state if has_heads else state.unsqueeze(1)
    x4, dt4, z4 = (None if t is None else (t if t.dim() == 3 else t.unsqueeze(1)) for t in (x, dt, z))
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    B3, C3 = (t if t.dim() == 3 else t.unsqueeze(1) for t in (B, C))
    D2, bias2 = (None if t is None else (t if t.dim() == 2 else t.unsqueeze(0)) for t in (D, dt_bias))
    _, h, p, n = st.shape
    b = x4.shape[0]

    def need(name, t, want, layout):
        if t is not None and tuple(t.shape) != want:
            raise ScanExportError(f"{name} must have shape {layout} = {want}, got {_shape(t)}")

    need("x", x4, (b, h, p), "(batch, nheads, dim)")
    need("dt", dt4, (b, h, p), "(batch, nheads, dim)")
    need("z", z4, (b, h, p), "(batch, nheads, dim)")
    need("A", A3, (h, p, n), "(nheads, dim, dstate)")
    g = B3.shape[1]
    if g == 0 or h % g:
        raise ScanExportError(f"B has {g} groups, but nheads={h} is not divisible by groups; got {_shape(B)}")
    need("B", B3, (b, g, n), "(batch, ngroups, dstate)")
    need("C", C3, (b, g, n), "(batch, ngroups, dstate)")
    need("D", D2, (h, p), "(nheads, dim)")
    need("dt_bias", bias2, (h, p), "(nheads, dim)")
    for name, t in (("state", st), ("x", x4), ("dt", dt4), ("A", A3), ("B", B3), ("C", C3), ("D", D2), ("z", z4),
                    ("dt_bias", bias2)):
        if t is not None and not t.is_floating_point():
            raise ScanExportError(f"{name} must be a real floating tensor, got {_shape(t)}")
    if state_batch_indices is not None:
        if state_batch_indices.is_floating_point() or tuple(state_batch_indices.shape) != (b,):
            raise ScanExportError(f"state_batch_indices must be an integer tensor (batch,) = ({b},), "
                                  f"got {_shape(state_batch_indices)}")
        rows = state_batch_indices.to(torch.int64)
        valid = rows >= 0
        old = st[rows.clamp(min=0)]  # (b, h, p, n); padding rows read row 0 and are discarded
    else:
        old = st
        if old.shape[0] != b:
            raise ScanExportError(f"state must have x's batch {b}, got {_shape(state)}")

    f = torch.float64 if torch.float64 in (state.dtype, x.dtype) else torch.float32  # mamba's kernel: fp32
    delta = dt4.to(f)
    if bias2 is not None:
        delta = delta + bias2.to(f)
    if dt_softplus:
        delta = F.softplus(delta)  # threshold 20, as the kernel's softplus
    rep = h // g
    Bh, Ch = (t.to(f).repeat_interleave(rep, dim=1)[:, :, None, :] for t in (B3, C3))  # (b, h, 1, n)
    xf = x4.to(f)
    new = old.to(f) * torch.exp(A3.to(f) * delta[..., None]) + Bh * (delta * xf)[..., None]  # (b, h, p, n)
    out = (new * Ch).sum(-1)
    if D2 is not None:
        out = out + xf * D2.to(f)
    if z4 is not None:
        out = out * F.silu(z4.to(f))
    if state_batch_indices is None:
        st.copy_(new)
    else:
        st[rows[valid]] = new[valid].to(st.dtype)
        out = out * valid[:, None, None].to(f)
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)
