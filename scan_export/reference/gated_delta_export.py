"""The Gated DeltaNet entry point models call: eager chunked math, and while
`torch.compiler.is_exporting()` torch ops + torch's scan higher-order op, which a plain
`torch.onnx.export(dynamo=True)` turns into an ONNX Scan over time (export_bodies explains the
scan plumbing). The exported body mirrors the ONNX sequential lowering (onnx/lowering/gated_delta.py)
op for op, so the two routes agree to rounding:
    δ = βv − αβ·kᵀS,  o = α·qᵀS + (q·k)·δ,  S' = α·S + k ⊗ δ,   [kᵀS; qᵀS] one MatMul
Shapes as reference.gated_delta; batch and seqlen stay symbolic, head counts and dims static.
"""

from __future__ import annotations

import torch

from .export_bodies import _as_carry, _detached_scan
from .gated_delta import GDN_DEFAULT_CHUNK_SIZE, _heads, _initial, gated_delta_rule_chunked

# exp(−60) = 9e-27 of the previous state is invisible in float32 and float64; the floor keeps
# onnxruntime's Exp off its denormal slow path (the same floor as the ONNX lowering's).
LOG_DECAY_MIN = -60.0


def gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=True, use_qk_l2norm=True,
                     chunk_size=GDN_DEFAULT_CHUNK_SIZE):
    """q, k: (b, l, hk, dk)  v: (b, l, h, dv)  g, beta: (b, l, h)  initial_state: (b, h, dk, dv)
    -> o: (b, l, h, dv), final_state: (b, h, dk, dv) or None (as transformers' torch_*_gated_delta_rule)."""
    if torch.compiler.is_exporting():
        o, S = gated_delta_rule_body(q, k, v, g, beta, initial_state, use_qk_l2norm)
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
