"""The Gated DeltaNet entry point models call: eager chunked math, and while
`torch.compiler.is_exporting()` torch ops + torch's scan higher-order op, which a plain
`torch.onnx.export(dynamo=True)` turns into an ONNX Scan (export_bodies explains the scan
plumbing). The default export_form="sequential" traces a scan over time that mirrors the ONNX
sequential lowering (onnx/lowering/gated_delta.py) op for op, so the two routes agree to rounding:
    δ = βv − αβ·kᵀS,  o = α·qᵀS + (q·k)·δ,  S' = α·S + k ⊗ δ,   [kᵀS; qᵀS] one MatMul
export_form="chunked" traces a scan over chunks instead, as the ONNX chunked lowering without its
l = 1 branch. Shapes as reference.gated_delta; batch and seqlen stay symbolic, head counts and
dims static."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .export_bodies import _as_carry, _detached_scan
from ..errors import ScanExportError
from .gated_delta import GDN_DEFAULT_CHUNK_SIZE, _heads, _initial, chunk_operands, gated_delta_rule_chunked

# exp(−60) = 9e-27 of the previous state is invisible in float32 and float64; the floor keeps
# onnxruntime's Exp off its denormal slow path (the same floor as the ONNX lowering's).
LOG_DECAY_MIN = -60.0


EXPORT_FORMS = ("sequential", "chunked")


def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=True, use_qk_l2norm=True,
                     chunk_size=GDN_DEFAULT_CHUNK_SIZE, export_form="sequential"):
    """q, k: (b, l, hk, dk)  v: (b, l, h, dv)  g, beta: (b, l, h)  initial_state: (b, h, dk, dv)
    -> o: (b, l, h, dv), final_state: (b, h, dk, dv) or None (as transformers' torch_*_gated_delta_rule).

    export_form: what an export traces. "sequential" (a Scan over time) serves decode and prefill
    alike; "chunked" (a Scan over chunks) is 2x faster for long prefills in onnxruntime CPU but
    pads a decode step to a whole chunk, 150x slower there (docs/numerics.md, Gated DeltaNet)."""
    if export_form not in EXPORT_FORMS:
        raise ScanExportError(f"export_form must be one of {EXPORT_FORMS}, got {export_form!r}")
    if torch.compiler.is_exporting():
        body = gated_delta_rule_body if export_form == "sequential" else gated_delta_rule_chunked_body
        extra = {} if export_form == "sequential" else {"chunk_size": chunk_size}
        o, S = body(q, k, v, g, beta, initial_state, use_qk_l2norm, **extra)
        return o, (S if output_final_state else None)
    return gated_delta_rule_chunked(q, k, v, g, beta, initial_state, output_final_state, use_qk_l2norm, chunk_size)


def gated_delta_rule_body(q, k, v, g, beta, initial_state=None, use_qk_l2norm=True):
    """The sequential form as torch ops + one scan over time -> (o, final_state)."""
    dtype_in = v.dtype
    f = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (t.to(f) for t in (q, k, v, g, beta))
    b, l, hk, dk = k.shape
    h = v.shape[2]
    if h != hk:  # expand + reshape rather than repeat_interleave: one Expand in the graph
        q, k = (t.unsqueeze(3).expand(b, l, hk, h // hk, dk).reshape(b, l, h, dk) for t in (q, k))
    q, k = _heads(q, k, v, g, beta, use_qk_l2norm)
    S0 = _initial(initial_state, v, dk, f)
    alpha = torch.exp(g.clamp_min(LOG_DECAY_MIN))
    time_first = lambda t: t.transpose(0, 1)[..., None, None]  # noqa: E731  (b, l, h) -> (l, b, h, 1, 1)
    xs = [time_first(alpha), time_first(alpha * beta), time_first((q * k).sum(-1)),
          torch.stack([k, q], 3).transpose(0, 1),  # (l, b, h, 2, dk)
          k.transpose(0, 1).unsqueeze(-1),  # (l, b, h, dk, 1)
          (v * beta.unsqueeze(-1)).transpose(0, 1).unsqueeze(3)]  # (l, b, h, 1, dv)

    def step(S, xs_t, consts):  # the tensors come in as arguments (see export_bodies._detached_scan)
        a_t, ab_t, qk_t, kq_t, kc_t, bv_t = xs_t
        R = kq_t @ S  # (b, h, 2, dv): kᵀS and qᵀS of the old state
        delta = bv_t - ab_t * R[:, :, :1]
        o_t = a_t * R[:, :, 1:] + qk_t * delta
        return _as_carry(a_t * S + kc_t * delta), o_t

    S, ys = _detached_scan(step, S0, xs)  # ys: (l, b, h, 1, dv)
    return ys.squeeze(3).transpose(0, 1).to(dtype_in), S


def gated_delta_rule_chunked_body(q, k, v, g, beta, initial_state=None, use_qk_l2norm=True,
                                  chunk_size=GDN_DEFAULT_CHUNK_SIZE):
    """The chunked form as torch ops + one scan over chunks -> (o, final_state): the WY operands of
    every chunk in bulk (reference.gated_delta.chunk_operands), then four MatMuls per chunk, as
    the ONNX chunked lowering (which adds a one-step branch for l = 1; here a decode call is
    padded to one chunk, so use the sequential body for decode)."""
    dtype_in = v.dtype
    f = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (t.to(f) for t in (q, k, v, g, beta))
    b, l, hk, dk = k.shape
    h, dv = v.shape[2], v.shape[3]
    if h != hk:
        q, k = (t.unsqueeze(3).expand(b, l, hk, h // hk, dk).reshape(b, l, h, dk) for t in (q, k))
    q, k = _heads(q, k, v, g, beta, use_qk_l2norm)
    S0 = _initial(initial_state, v, dk, f)
    T = chunk_size
    pad = (T - l % T) % T

    def chunks(t):  # (b, l, h[, d]) -> (nc, b, h, T[, d]), padded with identity steps
        t = t if t.dim() == 4 else t.unsqueeze(-1)
        t = F.pad(t, [0, 0, 0, 0, 0, pad]).unflatten(1, (-1, T))  # (b, nc, T, h, d)
        return t.permute(1, 0, 3, 2, 4).contiguous()

    g_c, beta_c = (chunks(t).squeeze(-1) for t in (g.clamp_min(LOG_DECAY_MIN), beta))
    W1, W2, Qd, intra, Kend, decay = chunk_operands(chunks(q), chunks(k), chunks(v), g_c, beta_c, T)
    WQ = torch.cat([W2, Qd], 3)  # (nc, b, h, 2T, dk)

    def step(S, xs_t, consts):
        W1_t, WQ_t, in_t, KeT_t, d_t = xs_t
        R = WQ_t @ S  # (b, h, 2T, dv): W2·S and Qd·S of the old state
        U = W1_t - R[:, :, :T]
        o_t = R[:, :, T:] + in_t @ U
        return _as_carry(d_t * S + KeT_t @ U), o_t

    S, ys = _detached_scan(step, S0, [W1, WQ, intra, Kend.transpose(-1, -2), decay])  # ys: (nc, b, h, T, dv)
    o = ys.permute(1, 0, 3, 2, 4).reshape(b, -1, h, dv)[:, :l]
    return o.to(dtype_in), S
