"""Input generators for the numeric regimes of docs/numerics.md, shared by tests, check and bench.

  easy:   A = −0.5·rand,          Δ = 0.5·rand                chunk decay Λ(T=64) ≤ 35
  init:   A = −[1..n] per row,    Δ per channel log-uniform in [1e-3, 0.1] (mamba's dt init),
                                  ±10% jitter per position            Λ(T=64) ≈ 100
  heavy:  A down to −1000 in some channels, Δ spikes to 5      one step alone can exceed 88

Δ is generated after softplus and mapped back through softplus⁻¹, so every regime means the same
thing with delta_softplus on or off.
"""

from __future__ import annotations

import math

import torch

from ..errors import ScanExportError

REGIMES = ("easy", "init", "heavy")


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _mamba_init_dt(batch, dim, seqlen, gen):
    """mamba's dt_proj init: one step size per channel, log-uniform in [1e-3, 0.1]; ±10% per position."""
    lo, hi = math.log(1e-3), math.log(0.1)
    per_channel = torch.exp(lo + (hi - lo) * torch.rand(1, dim, 1, generator=gen, dtype=torch.float64))
    return per_channel * torch.exp(0.1 * torch.randn(batch, dim, seqlen, generator=gen, dtype=torch.float64))


def make_A_delta(regime: str, batch: int, dim: int, dstate: int, seqlen: int, gen: torch.Generator):
    """-> (A: (d, n), Δ: (b, d, l)) float64, Δ already positive (post-softplus)."""
    if regime == "easy":
        A = -0.5 * torch.rand(dim, dstate, generator=gen, dtype=torch.float64)
        dt = 0.5 * torch.rand(batch, dim, seqlen, generator=gen, dtype=torch.float64)
    elif regime == "init":
        A = -torch.arange(1, dstate + 1, dtype=torch.float64).repeat(dim, 1)
        dt = _mamba_init_dt(batch, dim, seqlen, gen)
    elif regime == "heavy":
        A = -torch.arange(1, dstate + 1, dtype=torch.float64).repeat(dim, 1)
        scale = torch.where(torch.rand(dim, 1, generator=gen) < 0.25, 60.0, 1.0).to(torch.float64)
        A = A * scale  # some channels reach −960
        dt = _mamba_init_dt(batch, dim, seqlen, gen)
        spikes = torch.rand(batch, dim, seqlen, generator=gen) < 0.03
        dt = torch.where(spikes, 1.7 + 3.3 * torch.rand(batch, dim, seqlen, generator=gen, dtype=torch.float64), dt)
    else:
        raise ScanExportError(f"regime must be one of {REGIMES}, got {regime!r}")
    return A, dt


def make_scan_inputs(
    regime="easy", batch=2, dim=8, dstate=4, seqlen=33, groups=1, *, with_D=True, with_z=True,
    with_delta_bias=True, with_initial_state=False, delta_softplus=True, seed=0, dtype=torch.float32,
):
    """A dict of selective_scan_* keyword arguments. B, C are (b, n, l) for groups == 1, else (b, g, n, l)."""
    gen = torch.Generator().manual_seed(seed)
    A, dt = make_A_delta(regime, batch, dim, dstate, seqlen, gen)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    bc_shape = (batch, dstate, seqlen) if groups == 1 else (batch, groups, dstate, seqlen)
    delta_bias = 0.1 * randn(dim) if with_delta_bias else None
    raw = dt
    if delta_softplus:
        raw = _inverse_softplus(dt)
    if delta_bias is not None:
        raw = raw - delta_bias[:, None]
    args = dict(
        u=randn(batch, dim, seqlen), delta=raw, A=A, B=randn(*bc_shape), C=randn(*bc_shape),
        D=randn(dim) if with_D else None, z=randn(batch, dim, seqlen) if with_z else None,
        delta_bias=delta_bias,
        initial_state=randn(batch, dim, dstate) if with_initial_state else None,
    )
    out = {k: (v.to(dtype) if v is not None else None) for k, v in args.items()}
    out["delta_softplus"] = delta_softplus
    return out


def make_ssd_inputs(regime="easy", batch=2, seqlen=33, heads=4, headdim=8, groups=1, dstate=16, *,
                    with_D=True, d_per_channel=False, with_z=False, with_dt_bias=True, with_initial_states=False,
                    dt_softplus=True, seed=0, dtype=torch.float32):
    """Keyword arguments for ssd_scan_* / mamba_chunk_scan_combined; one A and Δ per head."""
    gen = torch.Generator().manual_seed(seed)
    A_hn, dt = make_A_delta(regime, batch, heads, 1, seqlen, gen)  # A: (h, 1), Δ: (b, h, l)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    dt_bias = 0.1 * randn(heads) if with_dt_bias else None
    raw = dt.transpose(1, 2)  # (b, l, h)
    if dt_softplus:
        raw = _inverse_softplus(raw)
    if dt_bias is not None:
        raw = raw - dt_bias
    args = dict(
        x=randn(batch, seqlen, heads, headdim), dt=raw, A=A_hn[:, 0],
        B=randn(batch, seqlen, groups, dstate), C=randn(batch, seqlen, groups, dstate),
        D=(randn(heads, headdim) if d_per_channel else randn(heads)) if with_D else None,
        z=randn(batch, seqlen, heads, headdim) if with_z else None, dt_bias=dt_bias,
        initial_states=randn(batch, heads, headdim, dstate) if with_initial_states else None,
    )
    out = {k: (v.to(dtype) if v is not None else None) for k, v in args.items()}
    out["dt_softplus"] = dt_softplus
    return out
