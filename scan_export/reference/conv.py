"""Causal depthwise conv1d with explicit state, the Mamba conv in a form that serves prefill and decode.

  x: (b, l, d) channels-last   conv_state: (b, K−1, d), the last K−1 inputs seen, oldest first
  weight: (d, 1, K) as in nn.Conv1d / HF checkpoints   bias: (d,)
The state holds K−1 columns, the least the next step needs (llama.cpp keeps the same (K−1, d)
per sequence). Channels-last keeps the model's linear layers free of transposes, which
onnxruntime would otherwise fuse into slow transposed GEMMs at decode.
"""

from __future__ import annotations

import torch

from ..errors import ScanExportError


def causal_conv1d_with_state(x, conv_state, weight, bias=None):
    """-> (y: (b, l, d), new_conv_state: (b, K−1, d)); a causal conv over [history, x]."""
    d, k = weight.shape[0], weight.shape[-1]
    if conv_state.dim() != 3 or conv_state.shape[1] != k - 1 or conv_state.shape[2] != d:
        raise ScanExportError(f"conv_state must be (batch, {k - 1}, {d}), got {tuple(conv_state.shape)}")
    l = x.shape[1]
    xs = torch.cat([conv_state.to(x.dtype), x], dim=1)  # (b, K−1 + l, d)
    w = weight.reshape(d, k).to(x.dtype)
    y = xs[:, 0:l] * w[:, 0]
    for j in range(1, k):  # K is static (4 in every released Mamba)
        y = y + xs[:, j:j + l] * w[:, j]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, xs[:, xs.shape[1] - (k - 1):]
