"""torch.library custom ops: the exportable drop-ins. Eager = reference.selective_scan_sequential
(the selective scan's forward: one fused op per step, faster than the chunked form on CPU) and
reference.*_chunked (the SSD scan, and every backward, recomputed differentiably).

Two export routes, chosen by the drop-ins below (`exporting_plainly`):
  * plain `torch.onnx.export(dynamo=True)` (or any torch.export): the drop-ins call export_bodies,
    torch ops and torch's scan higher-order op, which the exporter turns into an ONNX Scan itself;
  * scan_export.onnx.export, inside `opaque_ops()`: `scan_export::selective_scan` stays one opaque
    node, never the Python loop over chunks, and scan_export.onnx lowers it (ops.py registers the
    translation, lowering/ emits the Scan or Loop: targets, forms and lowerings to choose from).
Either way nothing is unrolled and no dimension is specialized.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

from .selective_scan import DEFAULT_CHUNK_SIZE, scan_sequential, selective_scan_chunked, selective_scan_sequential
from .validate import check_scan_inputs, compute_dtype
from ..errors import ScanExportError

SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# ------------------------------------------------------------------------------------------------
# Export routing

_OPAQUE = contextvars.ContextVar("scan_export_opaque_ops", default=False)


@contextlib.contextmanager
def opaque_ops():
    """Inside, an export keeps each of our ops as one custom node (scan_export.onnx.export lowers them)."""
    token = _OPAQUE.set(True)
    try:
        yield
    finally:
        _OPAQUE.reset(token)


def exporting_plainly() -> bool:
    """True while torch.export traces (as torch.onnx.export(dynamo=True) does) outside opaque_ops():
    the drop-ins then trace export_bodies, which torch.onnx.export translates without our help."""
    return torch.compiler.is_exporting() and not _OPAQUE.get()


@torch.library.custom_op("scan_export::selective_scan", mutates_args=())
def selective_scan_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor], delta_softplus: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The forward runs below autograd: the in-place sequential scan, 1.3-2x faster than the chunked
    # one on CPU (benchmarks/eager_scan.py); the backward recomputes with the differentiable
    # chunked form (_selective_scan_forward), equal to rounding.
    out, last_state = selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                                                initial_state)
    # Fresh contiguous outputs: opcheck rejects views with foreign strides or offsets.
    return out.contiguous().clone(), last_state.contiguous().clone()


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size):
    return torch.empty_like(u), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=compute_dtype(u))


def register_recompute_autograd(op, forward, n_tensors: int) -> None:
    """Give a custom op a backward that recomputes `forward` under autograd (checkpoint style).

    op's first n_tensors inputs are tensors (or None); the rest are options passed through.
    forward(*tensors, *options) must return the op's outputs as a tuple.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.options = inputs[n_tensors:]

    def backward(ctx, *grad_outputs):
        leaves = [x.detach().requires_grad_(True) if x is not None and ctx.needs_input_grad[i] else x
                  for i, x in enumerate(ctx.saved_tensors)]
        wanted = [x for i, x in enumerate(leaves) if x is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            outputs = forward(*leaves, *ctx.options)
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        result = [next(grads) if x is not None and ctx.needs_input_grad[i] else None for i, x in enumerate(leaves)]
        return (*result, *(None for _ in ctx.options))

    op.register_autograd(backward, setup_context=setup_context)


def _selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size):
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state, chunk_size)


register_recompute_autograd(selective_scan_op, _selective_scan_forward, n_tensors=9)


def _plain_eager(*tensors) -> bool:
    """True for an eager call that needs no graph and no gradient: the drop-in then runs the
    sequential scan itself, without the custom op's dispatch (40 us a call, as much as the whole
    scan at a decode step, benchmarks/eager_scan.py). Tracing (torch.compile, torch.export, our
    export) and anything autograd will differentiate take the op."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return not any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors if t is not None)


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, chunk_size=DEFAULT_CHUNK_SIZE,
):
    """Drop-in for mamba_ssm's `selective_scan_fn`, exportable with torch.onnx.export(dynamo=True).

    u, delta, z: (b, d, l)   A: (d, n)   B, C: (d, n) | (b, n, l) | (b, g, n, l)
    D, delta_bias: (d,)      initial_state: (b, d, n), our extension (zeros when None)
    Returns out: (b, d, l), and last_state: (b, d, n) float32 (float64 for float64 u) when asked.
    """
    dims = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if _plain_eager(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last_state = scan_sequential(dims, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                          initial_state)
        return (out, last_state) if return_last_state else out
    if exporting_plainly():
        from .export_bodies import selective_scan_body

        out, last_state = selective_scan_body(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus))
        return (out, last_state) if return_last_state else out
    out, last_state = selective_scan_op(
        u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), int(chunk_size)
    )
    return (out, last_state) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# Mamba-2 (SSD)

from .ssd import (SSD_DEFAULT_CHUNK_SIZE, check_ssd_inputs, rounding_dtype, ssd_scan_chunked,  # noqa: E402
                  state_dtype_of)

SSD_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "seq_idx")


@torch.library.custom_op("scan_export::ssd_scan", mutates_args=())
def ssd_scan_op(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
    initial_states: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor], chunk_size: int, dt_softplus: bool,
    dt_limit_lo: float, dt_limit_hi: float, state_round: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns y and the final states in the compute dtype; state_round names the dtype the states
    passed between chunks are stored in when narrower than that ("" when not)."""
    y, final = _ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
                            dt_limit_lo, dt_limit_hi, state_round)
    return y.contiguous().clone(), final.contiguous().clone()


@ssd_scan_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit_lo, dt_limit_hi,
      state_round):
    b, _, h, p = x.shape
    return torch.empty_like(x), x.new_empty((b, h, p, B.shape[-1]), dtype=compute_dtype(x))


def _ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, lo, hi, state_round):
    f = compute_dtype(x)
    y, final = ssd_scan_chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, None, dt_softplus,
                                (lo, hi), True, state_dtype=getattr(torch, state_round) if state_round else f)
    return y, final.to(f)  # the caller casts to the state dtype


register_recompute_autograd(ssd_scan_op, _ssd_forward, n_tensors=10)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=SSD_DEFAULT_CHUNK_SIZE, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                              dt_limit=(0.0, float("inf")), return_final_states=False, return_varlen_states=False,
                              state_dtype=None):
    """Drop-in for mamba_ssm's `mamba_chunk_scan_combined` (its full signature and return conventions).

    x, z: (b, l, h, p)  dt: (b, l, h)  A, dt_bias: (h,)  B, C: (b, l, g, n)  D: (h,) or (h, p)
    initial_states: (b, h, p, n)  seq_idx: (b, l) int, packed sequences (the state restarts where it
    changes)  cu_seqlens: (s + 1,) int, read only with return_varlen_states (batch 1).
    Returns y, then final states (b, h, p, n) if return_final_states, then varlen states (s, h, p, n)
    if return_varlen_states; states in state_dtype, else C's dtype. reference/ssd.py spells out
    mamba's semantics for each.
    ONNX (scan_export.onnx.export.export): everything but return_varlen_states, which is refused;
    seq_idx becomes an input of the exported scan; the native lowering takes neither seq_idx nor a
    state_dtype narrower than the compute dtype.
    """
    if return_varlen_states:
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            raise ScanExportError("return_varlen_states is not supported in ONNX export (mamba_ssm has no backward "
                                  "for it either); export with return_final_states and one sequence per row instead")
        # Eager only: the chunked scan itself (differentiable, where mamba_ssm raises in backward).
        return ssd_scan_chunked(x, dt, A, B, C, int(chunk_size), D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                                bool(dt_softplus), dt_limit, return_final_states, True, state_dtype)
    check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    round_to = rounding_dtype(C, state_dtype, compute_dtype(x))
    if exporting_plainly():
        if round_to is not None:
            raise ScanExportError(f"state_dtype {state_dtype} (narrower than the compute dtype) is not supported by "
                                  f"a plain torch.onnx.export yet; export with scan_export.onnx.export.export(module, "
                                  f"args, ...), which supports it")
        from .export_bodies import ssd_scan_body

        y, final = ssd_scan_body(x, dt, A, B, C, D, z, dt_bias, initial_states, int(chunk_size), bool(dt_softplus),
                                 (float(dt_limit[0]), float(dt_limit[1])), seq_idx)
        return (y, final.to(state_dtype_of(C, state_dtype))) if return_final_states else y
    y, final = ssd_scan_op(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, int(chunk_size), bool(dt_softplus),
                           float(dt_limit[0]), float(dt_limit[1]),
                           "" if round_to is None else str(round_to).removeprefix("torch."))
    return (y, final.to(state_dtype_of(C, state_dtype))) if return_final_states else y


# ------------------------------------------------------------------------------------------------
# Causal depthwise conv with state (both Mamba generations)

from .conv import causal_conv1d_with_state  # noqa: E402

CONV_INPUTS = ("x", "conv_state", "weight", "bias")


@torch.library.custom_op("scan_export::causal_conv", mutates_args=())
def causal_conv_op(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    y, state = causal_conv1d_with_state(x, conv_state, weight, bias)
    return y.contiguous().clone(), state.contiguous().clone()


@causal_conv_op.register_fake
def _(x, conv_state, weight, bias):
    return torch.empty_like(x), torch.empty_like(conv_state, dtype=x.dtype)


register_recompute_autograd(causal_conv_op, causal_conv1d_with_state, n_tensors=4)


def causal_conv(x, conv_state, weight, bias=None):
    """x: (b, l, c) channels-last, conv_state: (b, K−1, c), weight: (c, 1, K) -> (y, new conv_state).

    One exportable node: lowered to Slice/Mul/Add (portable) or CausalConvWithState (native, opset 27);
    a plain export traces the reference's slices instead."""
    if exporting_plainly():
        return causal_conv1d_with_state(x, conv_state, weight, bias)
    return causal_conv_op(x, conv_state, weight, bias)
