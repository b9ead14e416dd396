"""Causal depthwise conv1d with explicit state, the Mamba conv in a form that serves prefill and decode.

  x: (b, d, l)   conv_state: (b, d, K−1), the last K−1 inputs seen (zeros at the start)
  weight: (d, 1, K) as in nn.Conv1d / HF checkpoints   bias: (d,)
The state convention is TensorRT-LLM's and llama.cpp's: K−1 columns, the least that the next step needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_with_state(x, conv_state, weight, bias=None):
    """-> (y: (b, d, l), new_conv_state: (b, d, K−1)); equal to a causal conv over [history, x]."""
    d, k = weight.shape[0], weight.shape[-1]
    if conv_state.shape[-1] != k - 1 or conv_state.shape[1] != d:
        raise ValueError(f"conv_state must be (batch, {d}, {k - 1}), got {tuple(conv_state.shape)}")
    xs = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (b, d, K−1 + l)
    y = F.conv1d(xs, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=d)  # (b, d, l)
    return y, xs[..., xs.shape[-1] - (k - 1):]
