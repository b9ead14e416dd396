"""VMamba's calling conventions (MzeroMiko/VMamba, vmamba.py / csms6s.py / csm_triton.py), as
adapters on our drop-ins. VMamba defines these names itself, so no import line reaches them:
replace its definitions with these (`from scan_export.compat.vmamba import selective_scan_fn,
selective_scan_chunk_fn, cross_scan_fn, cross_merge_fn`) or assign them over its module's.

  selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True,
                    backend=None)
      delta_bias is the 7th positional argument (mamba_ssm's 7th is z; VMamba has no z);
      oflex=True returns float32 whatever u's dtype (VMamba's "output float"), False u's dtype;
      backend (which CUDA kernel) is ignored.
  selective_scan_chunk_fn(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                          initial_states=None, seq_idx=None, dt_softplus=False, dt_limit=(0, inf),
                          return_final_states=False, backend=None)
      mamba_chunk_scan_combined without cu_seqlens: passed positionally to ours, dt_softplus
      would land in cu_seqlens; this adapter maps by name.
  cross_scan_fn(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False)
  cross_merge_fn(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False)
      VMamba's four-direction scan and its merge, in torch ops; VMamba's own enter
      torch.cuda.device(x.device), which a CPU tensor cannot. scans: 0 = row-major, column-major
      and both reversed; 1 = the row-major sequence 4 times; 2 = row-major twice and reversed twice.
      Layouts: x (b, c, H, W) | (b, H, W, c) by in_channel_first -> (b, 4, c, H·W) | (b, H·W, 4, c)
      by out_channel_first; merge takes y (b, 4, c, H, W) | (b, H, W, 4, c) and returns (b, c, H·W)
      | (b, H·W, c) by in_channel_first. one_by_one (a separate input per direction) is refused.
"""

from __future__ import annotations

import torch

from ..errors import ScanExportError
from ..reference.custom_ops import mamba_chunk_scan_combined
from ..reference.custom_ops import selective_scan_fn as _selective_scan_fn


def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True, backend=None):
    """VMamba's selective_scan_fn. u, delta: (b, k·d, l)  A: (k·d, n)  B, C: (b, k, n, l)  D, delta_bias: (k·d,)"""
    out = _selective_scan_fn(u, delta, A, B, C, D, z=None, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return out.float() if oflex else out.to(u.dtype)


def selective_scan_chunk_fn(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                            seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                            backend=None):
    """VMamba's selective_scan_chunk_fn: mamba_chunk_scan_combined's arguments, VMamba's order."""
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                     initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                                     dt_limit=dt_limit, return_final_states=return_final_states)


def _no_one_by_one(one_by_one):
    if one_by_one:
        raise ScanExportError("cross_scan_fn / cross_merge_fn: one_by_one=True is not supported by the adapter")


def cross_scan_fn(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
    """x: (b, c, H, W) | (b, H, W, c) -> xs: (b, 4, c, H·W) | (b, H·W, 4, c)."""
    _no_one_by_one(one_by_one)
    if not in_channel_first:
        x = x.permute(0, 3, 1, 2)  # -> (b, c, H, W)
    b, c = x.shape[:2]
    rows = x.flatten(2)  # (b, c, H·W) row-major
    if scans == 0:
        two = torch.stack([rows, x.transpose(2, 3).flatten(2)], dim=1)  # (b, 2, c, L)
        xs = torch.cat([two, two.flip(-1)], dim=1)
    elif scans == 1:
        xs = rows.unsqueeze(1).expand(b, 4, c, rows.shape[-1])
    elif scans == 2:
        two = rows.unsqueeze(1).expand(b, 2, c, rows.shape[-1])
        xs = torch.cat([two, two.flip(-1)], dim=1)
    else:
        raise ScanExportError(f"cross_scan_fn: scans must be 0, 1 or 2, got {scans!r}")
    return xs.contiguous() if out_channel_first else xs.permute(0, 3, 1, 2).contiguous()


def cross_merge_fn(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0, force_torch=False):
    """y: (b, 4, c, H, W) | (b, H, W, 4, c) -> (b, c, H·W) | (b, H·W, c)."""
    _no_one_by_one(one_by_one)
    if not out_channel_first:
        y = y.permute(0, 3, 4, 1, 2)  # -> (b, 4, c, H, W)
    b, k, c, H, W = y.shape
    ys = y.flatten(3)  # (b, 4, c, L)
    if scans == 0:
        two = ys[:, 0:2] + ys[:, 2:4].flip(-1)  # undo the reversal
        out = two[:, 0] + two[:, 1].unflatten(-1, (W, H)).transpose(2, 3).flatten(2)  # column-major back to rows
    elif scans == 1:
        out = ys.sum(1)
    elif scans == 2:
        out = (ys[:, 0:2] + ys[:, 2:4].flip(-1)).sum(1)
    else:
        raise ScanExportError(f"cross_merge_fn: scans must be 0, 1 or 2, got {scans!r}")
    return out if in_channel_first else out.transpose(1, 2)
