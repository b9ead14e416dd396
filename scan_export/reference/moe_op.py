"""The routed experts of a top-k mixture of experts as one exportable node: `scan_export::moe_experts`.

To the exporter it is one opaque node (like the scans in custom_ops.py); onnx/lowering/moe.py emits
a graph that computes only the experts each token was routed to, so time per token follows top-k,
not the expert count. Eager: a loop over the experts that received tokens (transformers' own loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOE_INPUTS = ("x", "top_k_index", "top_k_weights", "gate_up", "down")


def moe_experts_eager(x, top_k_index, top_k_weights, gate_up, down):
    """x: (N, H), top_k_index: (N, k) int64, top_k_weights: (N, k), gate_up: (E, 2I, H) (gate rows
    first), down: (E, H, I) -> (N, H) = Σ_k weight · down_e(silu(gate_e x) · up_e x)."""
    out = torch.zeros_like(x)
    for e in torch.unique(top_k_index).tolist():
        token, slot = torch.where(top_k_index == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


@torch.library.custom_op("scan_export::moe_experts", mutates_args=())
def moe_experts_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return moe_experts_eager(x, top_k_index, top_k_weights, gate_up, down).contiguous().clone()


@moe_experts_op.register_fake
def _(x, top_k_index, top_k_weights, gate_up, down):
    return torch.empty_like(x)


def moe_experts(x, top_k_index, top_k_weights, gate_up, down):
    """See moe_experts_eager; one node in an exported graph."""
    return moe_experts_op(x, top_k_index, top_k_weights, gate_up, down)
