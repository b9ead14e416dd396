"""torch.library custom ops: the exportable drop-ins. Eager = reference.*_chunked.

To the exporter, `scan_export::selective_scan` is one opaque node, never the Python loop over
chunks, so nothing is unrolled and no dimension is specialized. How that node becomes ONNX lives in
scan_export.onnx (ops.py registers the translation, lowering/ emits the Loop).
"""

from __future__ import annotations

from typing import Optional

import torch

from .selective_scan import DEFAULT_CHUNK_SIZE, selective_scan_chunked
from .validate import check_scan_inputs, compute_dtype

SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@torch.library.custom_op("scan_export::selective_scan", mutates_args=())
def selective_scan_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor], delta_softplus: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, last_state = selective_scan_chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state, chunk_size
    )
    # Fresh contiguous outputs: opcheck rejects views with foreign strides or offsets.
    return out.contiguous().clone(), last_state.contiguous().clone()


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size):
    return torch.empty_like(u), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=compute_dtype(u))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.delta_softplus, ctx.chunk_size = inputs[9], inputs[10]


def _backward(ctx, grad_out, grad_last_state):
    """Recompute the chunked scan under autograd and pull the gradients through it."""
    saved = ctx.saved_tensors
    leaves = [
        x.detach().requires_grad_(True) if x is not None and ctx.needs_input_grad[i] else x
        for i, x in enumerate(saved)
    ]
    wanted = [x for i, x in enumerate(leaves) if x is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        out, last_state = selective_scan_chunked(
            *leaves[:5], *leaves[5:8], ctx.delta_softplus, True, leaves[8], ctx.chunk_size
        )
        pairs = [(o, g) for o, g in ((out, grad_out), (last_state, grad_last_state)) if g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    result = [next(grads) if x is not None and ctx.needs_input_grad[i] else None for i, x in enumerate(leaves)]
    return (*result, None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, chunk_size=DEFAULT_CHUNK_SIZE,
):
    """Drop-in for mamba_ssm's `selective_scan_fn`, exportable with torch.onnx.export(dynamo=True).

    u, delta, z: (b, d, l)   A: (d, n)   B, C: (d, n) | (b, n, l) | (b, g, n, l)
    D, delta_bias: (d,)      initial_state: (b, d, n), our extension (zeros when None)
    Returns out: (b, d, l), and last_state: (b, d, n) float32 (float64 for float64 u) when asked.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, last_state = selective_scan_op(
        u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), int(chunk_size)
    )
    return (out, last_state) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# Mamba-2 (SSD)

from .ssd import SSD_DEFAULT_CHUNK_SIZE, check_ssd_inputs, ssd_scan_chunked  # noqa: E402

SSD_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@torch.library.custom_op("scan_export::ssd_scan", mutates_args=())
def ssd_scan_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
    initial_states: Optional[torch.Tensor], chunk_size: int, dt_softplus: bool, dt_limit_lo: float,
    dt_limit_hi: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, final = ssd_scan_chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                                (dt_limit_lo, dt_limit_hi), True)
    return y.contiguous().clone(), final.contiguous().clone()


@ssd_scan_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_limit_lo, dt_limit_hi):
    b, _, h, p = x.shape
    return torch.empty_like(x), x.new_empty((b, h, p, B.shape[-1]), dtype=compute_dtype(x))


def _ssd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.options = inputs[9:]


def _ssd_backward(ctx, grad_y, grad_final):
    leaves = [x.detach().requires_grad_(True) if x is not None and ctx.needs_input_grad[i] else x
              for i, x in enumerate(ctx.saved_tensors)]
    wanted = [x for i, x in enumerate(leaves) if x is not None and ctx.needs_input_grad[i]]
    chunk_size, softplus, lo, hi = ctx.options
    with torch.enable_grad():
        y, final = ssd_scan_chunked(*leaves[:5], chunk_size, *leaves[5:], softplus, (lo, hi), True)
        pairs = [(o, g) for o, g in ((y, grad_y), (final, grad_final)) if g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    result = [next(grads) if x is not None and ctx.needs_input_grad[i] else None for i, x in enumerate(leaves)]
    return (*result, None, None, None, None)


ssd_scan_op.register_autograd(_ssd_backward, setup_context=_ssd_setup_context)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=SSD_DEFAULT_CHUNK_SIZE, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False,
                              dt_limit=(0.0, float("inf")), return_final_states=False):
    """Drop-in for mamba_ssm's `mamba_chunk_scan_combined`, exportable with torch.onnx.export(dynamo=True).

    x, z: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)  D: (h,) or (h, p)
    initial_states: (b, h, p, n). Returns y: (b, l, h, p) and, when asked, final states (b, h, p, n).
    """
    if seq_idx is not None:
        raise ValueError("seq_idx (packed variable-length sequences) is not supported; pass one sequence per batch row")
    check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    y, final = ssd_scan_op(x, dt, A, B, C, D, z, dt_bias, initial_states, int(chunk_size), bool(dt_softplus),
                           float(dt_limit[0]), float(dt_limit[1]))
    return (y, final) if return_final_states else y
