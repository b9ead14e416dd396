"""Input contracts for the selective scan, shared by every implementation.

Glossary (mamba_ssm naming):
  b: batch   d: channels (d_inner)   l: seqlen   n: dstate   g: groups of B/C

Shapes accepted:
  u, delta, z:        (b, d, l)
  A:                  (d, n), real
  B, C:               fixed (d, n) | variable (b, n, l) | grouped (b, g, n, l), d % g == 0, each on its own:
                      one fixed and the other input-dependent is allowed (mamba_ssm's selective_scan_ref
                      and CUDA kernel accept it); two input-dependent ones must have the same group count
                      ((b, n, l) counts as one group), as mamba_ssm's CUDA kernel requires
  D, delta_bias:      (d,)
  initial_state:      (b, d, n)

Every failure is a ValueError that names the argument, the expected layout, and what arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ScanExportError


@dataclass(frozen=True)
class ScanDims:
    batch: int
    dim: int
    seqlen: int
    dstate: int
    groups: int  # groups of the input-dependent one(s) of B, C; 0 when both are fixed (d, n)
    B_fixed: bool = False  # B is (d, n)
    C_fixed: bool = False  # C is (d, n)


def _shape(x: torch.Tensor) -> str:
    return f"{tuple(x.shape)} ({x.dtype})"


def _require_rank(name: str, x: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ScanExportError(f"{name} must be a torch.Tensor with layout {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ScanExportError(f"{name} must be rank {rank} {layout}, got shape {_shape(x)}")


def _require_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != expected:
        raise ScanExportError(f"{name} must have shape {layout} = {expected}, got shape {_shape(x)}")


def _require_float(name: str, x: torch.Tensor) -> None:
    if x.is_complex():
        raise ScanExportError(
            f"{name} is complex ({x.dtype}); scan_export supports real selective scans only "
            "(complex A/B/C from the original S4D variant is not supported)"
        )
    if not x.is_floating_point():
        raise ScanExportError(f"{name} must be a floating tensor, got dtype {x.dtype}")


def _check_bc(name: str, x: torch.Tensor, b: int, d: int, l: int, n: int) -> int:
    """Returns the group count of B or C (0 for fixed (d, n))."""
    _require_float(name, x)
    if x.dim() == 2:
        _require_shape(name, x, (d, n), "(dim, dstate)")
        return 0
    if x.dim() == 3:
        _require_shape(name, x, (b, n, l), "(batch, dstate, seqlen)")
        return 1
    if x.dim() == 4:
        g = x.shape[1]
        if g == 0 or d % g != 0:
            raise ScanExportError(f"{name} has {g} groups, but dim={d} is not divisible by groups; got shape {_shape(x)}")
        _require_shape(name, x, (b, g, n, l), "(batch, groups, dstate, seqlen)")
        return g
    raise ScanExportError(
        f"{name} must be (dim, dstate), (batch, dstate, seqlen) or (batch, groups, dstate, seqlen), "
        f"got shape {_shape(x)}"
    )


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> ScanDims:
    _require_rank("u", u, 3, "(batch, dim, seqlen)")
    _require_float("u", u)
    b, d, l = u.shape
    if l == 0:
        raise ScanExportError(f"u must have seqlen >= 1, got shape {_shape(u)}")
    _require_rank("delta", delta, 3, "(batch, dim, seqlen)")
    _require_shape("delta", delta, (b, d, l), "(batch, dim, seqlen)")
    _require_rank("A", A, 2, "(dim, dstate)")
    _require_float("A", A)
    n = A.shape[1]
    _require_shape("A", A, (d, n), "(dim, dstate)")
    gb = _check_bc("B", B, b, d, l, n)
    gc = _check_bc("C", C, b, d, l, n)
    if gb and gc and gb != gc:
        raise ScanExportError(f"B and C must have the same number of groups when both are input-dependent, "
                              f"got B {_shape(B)} ({gb}) and C {_shape(C)} ({gc})")
    if z is not None:
        _require_rank("z", z, 3, "(batch, dim, seqlen)")
        _require_shape("z", z, (b, d, l), "(batch, dim, seqlen)")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None:
            _require_rank(name, vec, 1, "(dim,)")
            _require_float(name, vec)
            _require_shape(name, vec, (d,), "(dim,)")
    if initial_state is not None:
        _require_rank("initial_state", initial_state, 3, "(batch, dim, dstate)")
        _require_float("initial_state", initial_state)
        _require_shape("initial_state", initial_state, (b, d, n), "(batch, dim, dstate)")

    # Activations share u's dtype; parameters may be float32 (mamba keeps A/D in fp32 under fp16 AMP).
    # A fixed B or C is a weight (mamba_ssm: weight dtype), an input-dependent one an activation.
    activations = {"delta": delta, "z": z} | {name: x for name, x, g in (("B", B, gb), ("C", C, gc)) if g}
    for name, x in activations.items():
        if x is not None:
            _require_float(name, x)
            if x.dtype != u.dtype:
                raise ScanExportError(f"{name} must have u's dtype {u.dtype}, got {_shape(x)}")
    params = {"A": A, "D": D, "delta_bias": delta_bias, "initial_state": initial_state}
    params |= {name: x for name, x, g in (("B", B, gb), ("C", C, gc)) if not g}
    for name, x in params.items():
        if x is not None and x.dtype not in (u.dtype, torch.float32, torch.float64):
            raise ScanExportError(f"{name} must be float32, float64 or u's dtype {u.dtype}, got {_shape(x)}")
    devices = {x.device for x in (u, delta, A, B, C, D, z, delta_bias, initial_state) if x is not None}
    if len(devices) > 1:
        raise ScanExportError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return ScanDims(b, d, l, n, max(gb, gc), B_fixed=gb == 0, C_fixed=gc == 0)


def compute_dtype(u: torch.Tensor) -> torch.dtype:
    """float64 inputs stay float64 (the oracle); everything else is computed in float32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32
