"""The routed experts of a top-k mixture of experts as one exportable node: `scan_export::moe_experts`.

To the exporter it is one opaque node (like the scans in custom_ops.py); onnx/lowering/moe.py emits
a graph that computes only the experts each token was routed to, so time per token follows top-k,
not the expert count. Eager: a loop over the experts that received tokens (transformers' own loop).

activation: each expert's MLP. "swiglu" (granite, jamba): gate_up holds the gate rows then the up
rows, (E, 2I, H), and the expert is down(silu(gate x) · up x). "relu2" (Nemotron-H's non-gated
experts): gate_up holds only up, (E, I, H), and the expert is down(relu(up x)²). "geglu": swiglu
with exact GELU for silu (Jamba with hidden_act "gelu", as transformers' model tester builds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOE_INPUTS = ("x", "top_k_index", "top_k_weights", "gate_up", "down")
ACTIVATIONS = ("swiglu", "geglu", "relu2")


def expert_activation(h, activation: str):
    """h: (M, 2I) for swiglu / geglu (gate first), (M, I) for relu2 -> (M, I)"""
    if activation == "relu2":
        return torch.square(F.relu(h))
    gate, up = h.chunk(2, dim=-1)
    return (F.gelu(gate) if activation == "geglu" else F.silu(gate)) * up


def moe_experts_eager(x, top_k_index, top_k_weights, gate_up, down, activation: str = "swiglu"):
    """x: (N, H), top_k_index: (N, k) int64, top_k_weights: (N, k), gate_up: (E, 2I, H) (gate rows
    first; (E, I, H) for relu2), down: (E, H, I) -> (N, H) = Σ_k weight · down_e(act(gate_up_e x))."""
    out = torch.zeros_like(x)
    for e in torch.unique(top_k_index).tolist():
        token, slot = torch.where(top_k_index == e)
        act = expert_activation(F.linear(x[token], gate_up[e]), activation)
        y = F.linear(act, down[e]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


@torch.library.custom_op("scan_export::moe_experts", mutates_args=())
def moe_experts_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   gate_up: torch.Tensor, down: torch.Tensor, activation: str = "swiglu") -> torch.Tensor:
    return moe_experts_eager(x, top_k_index, top_k_weights, gate_up, down, activation).contiguous().clone()


@moe_experts_op.register_fake
def _(x, top_k_index, top_k_weights, gate_up, down, activation="swiglu"):
    return torch.empty_like(x)


def moe_experts(x, top_k_index, top_k_weights, gate_up, down, activation: str = "swiglu"):
    """See moe_experts_eager; one node in an exported graph."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")  # a caller's bug
    return moe_experts_op(x, top_k_index, top_k_weights, gate_up, down, activation)
