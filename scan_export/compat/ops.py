"""mamba_ssm's and causal_conv1d's public functions, with their signatures and semantics, on our
drop-ins: eager on CPU and exportable with a plain torch.onnx.export(dynamo=True).

Glossary (mamba_ssm naming): b batch, d channels (d_inner), l seqlen, n dstate, w conv width,
r dt_rank, h heads, p head dim, g groups. Every function here is torch ops plus our scan drop-ins
(scan_export.reference.custom_ops), so the export route is theirs: one ONNX Scan per scan call.
What mamba_ssm's CUDA kernels do that no export needs (checkpoint_lvl, fused backward,
return_dropout_mask) is accepted and ignored, or refused by name where results would differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ScanExportError
from ..reference.custom_ops import mamba_chunk_scan_combined, selective_scan_fn
from ..reference.selective_scan import selective_scan_ref  # mamba's signature, float64 for float64
from ..reference.state_update import selective_state_update

__all__ = [
    "selective_scan_fn", "selective_scan_ref", "mamba_inner_fn", "mamba_inner_ref", "mamba_inner_fn_no_out_proj",
    "bimamba_inner_fn", "bimamba_inner_ref", "causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update",
    "causal_conv1d_update_ref", "rms_norm_fn", "layer_norm_fn", "rms_norm_ref", "layer_norm_ref", "RMSNorm",
    "LayerNorm", "rmsnorm_fn", "RMSNormGated", "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined",
    "mamba_split_conv1d_scan_ref", "selective_state_update", "selective_scan_cuda_fwd",
]


# ------------------------------------------------------------------------------------------------
# causal_conv1d: (b, d, l) layout, weight (d, w), optional activation


def _activation(y, activation):
    if activation in (None, False):
        return y
    if activation in ("silu", "swish", True):
        return F.silu(y)
    raise ScanExportError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """causal_conv1d's causal_conv1d_fn: depthwise causal conv over time.

    x: (b, d, l)  weight: (d, w)  bias: (d,)  initial_states: (b, d, w − 1), the inputs before x
    Returns out: (b, d, l), and final_states: (b, d, w − 1) (the last w − 1 inputs) if asked;
    final_states_out, when given, receives them in place (eager only). A depthwise F.conv1d,
    which exports as one ONNX Conv at any length.
    """
    if seq_idx is not None:
        raise ScanExportError("causal_conv1d_fn: seq_idx (packed sequences) is not supported; "
                              "run one sequence per batch row")
    if weight.dim() == 3:  # (d, 1, w), nn.Conv1d's layout: accepted as upstream's reference does
        weight = weight.squeeze(1)
    d, w = weight.shape
    dtype_in = x.dtype
    xw = x.to(weight.dtype)
    if initial_states is not None:
        history = initial_states.to(xw.dtype)
    else:
        history = xw.new_zeros(xw.shape[0], d, w - 1)
    padded = torch.cat([history, xw], dim=-1)  # (b, d, w − 1 + l)
    out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=d)  # (b, d, l)
    out = _activation(out, activation).to(dtype_in)
    if not return_final_states:
        return out
    final = padded[..., padded.shape[-1] - (w - 1):].to(dtype_in)  # (b, d, w − 1)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


causal_conv1d_ref = causal_conv1d_fn  # one implementation: both are the reference


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """causal_conv1d's causal_conv1d_update: decode steps; conv_state updated in place.

    x: (b, d) or (b, d, l)  conv_state: (b, d, s), s >= w − 1, the last s inputs, oldest first
    Returns out with x's shape. Eager only (it mutates conv_state).
    """
    if cache_seqlens is not None or conv_state_indices is not None:
        raise ScanExportError("causal_conv1d_update: cache_seqlens / conv_state_indices (circular and "
                              "indexed state buffers) are not supported")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    d, w = weight.shape
    one_step = x.dim() == 2
    xs = x.unsqueeze(-1) if one_step else x  # (b, d, l)
    s, l = conv_state.shape[-1], xs.shape[-1]
    if s < w - 1:
        raise ScanExportError(f"causal_conv1d_update: conv_state must hold at least width - 1 = {w - 1} "
                              f"steps, got {tuple(conv_state.shape)}")
    full = torch.cat([conv_state.to(xs.dtype), xs], dim=-1)  # (b, d, s + l)
    out = F.conv1d(full[..., s - (w - 1):], weight.unsqueeze(1).to(xs.dtype), bias, groups=d)  # (b, d, l)
    conv_state.copy_(full[..., l:])
    out = _activation(out, activation)
    return out.squeeze(-1) if one_step else out


causal_conv1d_update_ref = causal_conv1d_update


# ------------------------------------------------------------------------------------------------
# mamba_ssm.ops.triton.layer_norm: fused add + norm, residual out


def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                  rowscale=None, prenorm=False, residual_in_fp32=False, zero_centered_weight=False,
                  is_rms_norm=False, return_dropout_mask=False, out_dtype=None):
    """mamba_ssm's layer_norm_fn: x (+ residual) normalized over the last axis, times weight, + bias.

    Returns out (in out_dtype, else x's dtype), and with prenorm the sum it normalized (the new
    residual: residual's dtype, float32 with residual_in_fp32, else x's dtype). Computed in
    float32 (float64 for float64 inputs), as the Triton kernel does.
    """
    if x1 is not None or weight1 is not None or bias1 is not None or return_dropout_mask:
        raise ScanExportError("layer_norm_fn: x1 / weight1 / bias1 (parallel residual) and return_dropout_mask "
                              "are not supported")
    dtype_in = x.dtype
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(f)
    if rowscale is not None:
        h = h * rowscale.to(f)[..., None]
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p)
    if residual is not None:
        h = h + residual.to(f)
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else dtype_in)
    w = weight.to(f) + 1.0 if zero_centered_weight else weight.to(f)
    if is_rms_norm:
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        mean = h.mean(-1, keepdim=True)
        y = (h - mean) * torch.rsqrt((h - mean).square().mean(-1, keepdim=True) + eps)
    y = y * w
    if bias is not None:
        y = y + bias.to(f)
    out = y.to(out_dtype or dtype_in)
    return (out, h.to(res_dtype)) if prenorm else out


def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                rowscale=None, prenorm=False, residual_in_fp32=False, zero_centered_weight=False,
                return_dropout_mask=False, out_dtype=None):
    """mamba_ssm's rms_norm_fn: layer_norm_fn with is_rms_norm=True."""
    return layer_norm_fn(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                         residual_in_fp32, zero_centered_weight, True, return_dropout_mask, out_dtype)


def layer_norm_ref(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                   rowscale=None, prenorm=False, zero_centered_weight=False, dropout_mask=None, dropout_mask1=None,
                   upcast=False):
    return layer_norm_fn(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                         zero_centered_weight=zero_centered_weight)


def rms_norm_ref(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                 rowscale=None, prenorm=False, zero_centered_weight=False, dropout_mask=None, dropout_mask1=None,
                 upcast=False):
    return rms_norm_fn(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                       zero_centered_weight=zero_centered_weight)


class RMSNorm(nn.Module):
    """mamba_ssm.ops.triton.layer_norm.RMSNorm: forward(x, residual=None, prenorm=False, residual_in_fp32=False)."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, device=None, dtype=None):
        super().__init__()
        self.eps, self.zero_centered_weight = eps, zero_centered_weight
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        init = torch.zeros if zero_centered_weight else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        p = self.drop.p if self.drop is not None and self.training else 0.0
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps, dropout_p=p, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32, zero_centered_weight=self.zero_centered_weight)


class LayerNorm(nn.LayerNorm):
    """mamba_ssm.ops.triton.layer_norm.LayerNorm: nn.LayerNorm with forward(x, residual, prenorm, residual_in_fp32)."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return layer_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                             residual_in_fp32=residual_in_fp32)


# mamba_ssm.ops.triton.layernorm_gated (Mamba-2's gated norm)

def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba_ssm's gated rmsnorm_fn: per group of group_size channels (all when None); the gate
    silu(z) multiplies after the norm (norm_before_gate) or before it. Output in x's dtype."""
    dtype_in = x.dtype
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(f)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(f))
    size = group_size or h.shape[-1]
    g = h.unflatten(-1, (-1, size))  # (..., groups, group_size)
    h = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(f)
    if bias is not None:
        h = h + bias.to(f)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(f))
    return h.to(dtype_in)


class RMSNormGated(nn.Module):
    """mamba_ssm.ops.triton.layernorm_gated.RMSNorm: forward(x, z=None)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)


# ------------------------------------------------------------------------------------------------
# The fused inner functions (mamba_ssm.ops.selective_scan_interface), as their *_ref compute them


def _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias,
           C_proj_bias, delta_softplus, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, rms_eps=1e-6,
           flip=False, A_b=None):
    """The part every fused inner function shares -> y: (b, d, l), before out_proj.

    xz: (b, 2d, l) -> x, z -> x = silu(causal_conv1d(x)) -> x_dbl = x_proj(x): (b·l, r + 2n) ->
    Δ = delta_proj(x_dbl[:, :r]), B, C from x_dbl (unless given) -> selective_scan_fn(x, Δ, A, B, C,
    D, z, delta_bias). A_b (Vim's bimamba): the same x, Δ, B, C, z, flipped in time, scanned with
    A_b too, and the two outputs added (the backward one flipped back).
    """
    l = xz.shape[-1]
    r = delta_proj_weight.shape[1]
    n = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_fn(x, conv1d_weight, conv1d_bias, activation="silu")  # (b, d, l)
    x_dbl = F.linear(x.transpose(1, 2).flatten(0, 1), x_proj_weight)  # (b·l, r + 2n)
    delta = (delta_proj_weight @ x_dbl[:, :r].t()).unflatten(1, (-1, l)).transpose(0, 1)  # (b, d, l)

    def projected(given, start, bias, rms_weight):  # B or C: (b, n, l), unless given
        if given is not None:
            return given
        v = x_dbl[:, start:start + n]  # (b·l, n)
        if bias is not None:
            v = v + bias.to(v.dtype)
        if rms_weight is not None:
            v = rms_norm_fn(v, rms_weight, None, eps=rms_eps)
        return v.unflatten(0, (-1, l)).transpose(1, 2).contiguous()  # (b, n, l)

    B = projected(B, r, B_proj_bias, b_rms_weight)
    C = projected(C, r + n, C_proj_bias, c_rms_weight)
    if dt_rms_weight is not None:
        delta = rms_norm_fn(delta.transpose(1, 2), dt_rms_weight, None, eps=rms_eps).transpose(1, 2)
    y = selective_scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if A_b is not None:
        fl = lambda t: t.flip(-1) if t.dim() == 3 else t  # noqa: E731  (fixed (d, n) B/C stay)
        y_b = selective_scan_fn(fl(x), fl(delta), A_b, fl(B), fl(C), D, z=fl(z), delta_bias=delta_bias,
                                delta_softplus=delta_softplus)
        y = y + y_b.flip(-1)
    return y


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6):
    """mamba_ssm's mamba_inner_fn (Mamba's fused path): xz: (b, 2d, l) -> out_proj(y): (b, l, d_model).

    conv1d_weight: (d, 1, w)  x_proj_weight: (r + 2n, d)  delta_proj_weight: (d, r)
    out_proj_weight: (d_model, d)  A: (d, n)  b/c/dt_rms_weight: RMSNorm weights on B, C (n,) and
    Δ (d,) (Jamba's inner norms). checkpoint_lvl only chooses what the CUDA backward recomputes.
    """
    y = _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias,
               C_proj_bias, delta_softplus, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                    out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                    delta_softplus=True):
    return mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                          out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus)


def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None,
                               D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True,
                               checkpoint_lvl=1):
    """mamba_ssm 1.x's (and Vim's) mamba_inner_fn_no_out_proj -> y: (b, d, l)."""
    return _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias,
                  B_proj_bias, C_proj_bias, delta_softplus)


def bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                     out_proj_bias, A, A_b, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                     C_proj_bias=None, delta_softplus=True):
    """Vim's bimamba_inner_fn (bimamba v1): one conv and projection, scanned forward with A and
    backward (flipped in time) with A_b, the outputs summed, then out_proj -> (b, l, d_model).
    Both directions always: Vim's own use_fast_path=False branch drops the backward one."""
    y = _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias,
               C_proj_bias, delta_softplus, A_b=A_b)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


bimamba_inner_ref = bimamba_inner_fn


# ------------------------------------------------------------------------------------------------
# Mamba-2's fused path (mamba_ssm.ops.triton.ssd_combined)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """mamba_ssm's mamba_split_conv1d_scan_combined (Mamba2's use_mem_eff_path).

    zxbcdt: (b, l, 2·h·p + 2·g·n + h) = [z, x, B, C, dt]  conv1d_weight: (h·p + 2·g·n, w)
    A, dt_bias: (h,)  D: (h,) (then headdim) or (h, p). The conv runs over [x, B, C]; the scan is
    mamba_chunk_scan_combined with dt_softplus; the gate is z through the gated RMSNorm (per group
    of h·p / g channels, as the fused kernel) when rmsnorm_weight is given, else inside the scan.
    Returns out: (b, l, ·) (after outproj if given), and the final states if asked.
    """
    if D.dim() == 1:
        if headdim is None:
            raise ScanExportError("mamba_split_conv1d_scan_combined: headdim is required when D is (nheads,)")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    dstate = (zxbcdt.shape[-1] - 2 * dim - nheads) // ngroups // 2
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                           activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    gate_in_scan = rmsnorm_weight is None
    res = mamba_chunk_scan_combined(
        x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
        C.unflatten(-1, (ngroups, dstate)), chunk_size, D=D, z=z.unflatten(-1, (nheads, headdim)) if gate_in_scan
        else None, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states)
    y, final = res if return_final_states else (res, None)
    out = y.flatten(-2)  # (b, l, h·p)
    if not gate_in_scan:
        out = rmsnorm_fn(out, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                         norm_before_gate=norm_before_gate)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final) if return_final_states else out


mamba_split_conv1d_scan_ref = mamba_split_conv1d_scan_combined


# ------------------------------------------------------------------------------------------------
# selective_scan_cuda, the extension module some code calls directly


def selective_scan_cuda_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """selective_scan_cuda.fwd -> (out, x) or (out, x, out_z) with z: out = y + D·u (before the
    gate), out_z = out·silu(z); x: (b, d, 1, 2n) holds the last state at x[:, :, -1, 1::2], the
    one entry of the CUDA kernel's chunk states that callers read (mamba's SelectiveScanFn,
    VMamba's SelectiveScanMamba); the other entries are zeros."""
    out, last = selective_scan_fn(u, delta, A, B, C, D, z=None, delta_bias=delta_bias,
                                  delta_softplus=bool(delta_softplus), return_last_state=True)
    x = torch.stack([torch.zeros_like(last), last], dim=-1).flatten(-2).unsqueeze(2)  # (b, d, 1, 2n)
    if z is None:
        return out, x
    f = torch.float64 if out.dtype == torch.float64 else torch.float32  # the kernel gates in float32
    return out, x, (out.to(f) * F.silu(z.to(f))).to(out.dtype)


def selective_scan_cuda_bwd(*args, **kwargs):
    raise ScanExportError("selective_scan_cuda.bwd is not available (scan_export.compat): train with "
                          "mamba_ssm's selective_scan_fn (ours is differentiable), or export for inference")

