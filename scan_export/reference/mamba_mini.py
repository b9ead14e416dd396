"""mamba-mini's chunked scan (`selective_scan_easy`), the published cumsum/divide form, kept as the
benchmark baseline and as the regression witness for the overflow in docs/numerics.md. Not for use:
it returns NaN once |A|·ΣΔ over a chunk passes ~88 (Mamba init weights at chunk 64 already do).

Faithful to the original except for its `range(0, L - 1, chunk)` bug, fixed here so every position
is computed (the original drops the last step when L % chunk == 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mamba_mini_chunked_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, chunk_size=64):
    """u, delta: (b, d, l)  A: (d, n)  B, C: (b, g, n, l) or (b, n, l)  D, delta_bias: (d,) -> (b, d, l)"""
    dtype_in = u.dtype
    dts = delta.float()
    if delta_bias is not None:
        dts = dts + delta_bias.view(1, -1, 1).float()
    if delta_softplus:
        dts = F.softplus(dts)
    Bs, Cs = (x.unsqueeze(1) if x.dim() == 3 else x for x in (B, C))
    b, g, n, l = Bs.shape
    us = u.view(b, g, -1, l).permute(3, 0, 1, 2).float()  # (l, b, g, hd)
    dts = dts.view(b, g, -1, l).permute(3, 0, 1, 2)
    As = A.view(g, -1, n).float()  # (g, hd, n)
    Bs, Cs = (x.permute(3, 0, 1, 2).float() for x in (Bs, Cs))  # (l, b, g, n)
    h = us.new_zeros(b, g, As.shape[1], n)
    ys = []
    for i in range(0, l, chunk_size):
        ts = dts[i:i + chunk_size].cumsum(dim=0)
        Ats = torch.einsum("gdn,lbgd->lbgdn", As, ts).exp()  # overflows once |A|·ts > 88
        rAts = Ats / Ats[-1:]
        dtBus = torch.einsum("lbgd,lbgn->lbgdn", dts[i:i + chunk_size] * us[i:i + chunk_size], Bs[i:i + chunk_size])
        hs = rAts * (dtBus / rAts).cumsum(dim=0) + Ats * h.unsqueeze(0)
        ys.append(torch.einsum("lbgn,lbgdn->lbgd", Cs[i:i + chunk_size], hs))
        h = hs[-1]
    y = torch.cat(ys, dim=0)  # (l, b, g, hd)
    if D is not None:
        y = y + D.view(g, -1).float() * us
    return y.permute(1, 2, 3, 0).reshape(b, -1, l).to(dtype_in)
