"""RMS norms as transformers computes them: normalize in float32, scale in the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms_normalize(x32, eps: float):
    """x / sqrt(mean(x²) + eps). transformers writes x·rsqrt(·); the division is the same to one
    rounding, and it is the pattern onnxruntime fuses into one SimplifiedLayerNormalization kernel
    (seven ops per norm otherwise, which a decode step pays 49 times)."""
    return x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """transformers' MambaRMSNorm: normalize in float32, scale in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        return self.weight * _rms_normalize(x.float(), self.eps).to(dtype)


def weightless_rms(x, eps: float):
    """FalconMamba's extra norm on Δ, B and C (no weight)."""
    return _rms_normalize(x.float(), eps).type_as(x)


class GatedRMSNorm(nn.Module):
    """transformers' MambaRMSNormGated: y·silu(z), normalized per group of group_size, then scaled."""

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, gate):
        dtype = y.dtype
        y = y.float() * F.silu(gate.float())
        *lead, last = y.shape
        grouped = y.reshape(*lead, last // self.group_size, self.group_size)
        grouped = _rms_normalize(grouped, self.eps)
        return self.weight * grouped.reshape(*lead, last).to(dtype)


