"""Top-k mixture of experts (granite's block_sparse_moe): a router picks k experts per token and
only those run (reference/moe_op.py; one node in the export, lowered to compute only the routed ones)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..moe_op import moe_experts


class Router(nn.Module):
    """router.layer: (E, hidden). Softmax over the k best logits, in float32 (transformers' TopKRouter)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x):
        """x: (N, hidden) -> weights (N, k) in x's dtype, expert ids (N, k) int64"""
        logits = F.linear(x, self.layer.weight).float()
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1).type_as(x), top_index


class TopKMoE(nn.Module):
    """Parameters as granite checkpoints store them: input_linear.weight (E, 2·I, hidden) with the
    gate rows first, output_linear.weight (E, hidden, I), router.layer.weight (E, hidden)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.router = Router(hidden_size, num_experts, top_k)
        self.input_linear = _Experts(num_experts, 2 * intermediate_size, hidden_size)
        self.output_linear = _Experts(num_experts, hidden_size, intermediate_size)

    def forward(self, x):
        """x: (b, l, hidden) -> (b, l, hidden)"""
        b, l, h = x.shape
        flat = x.reshape(b * l, h)
        weights, index = self.router(flat)
        y = moe_experts(flat, index, weights, self.input_linear.weight, self.output_linear.weight)
        return y.view(b, l, h)


class _Experts(nn.Module):
    """One (E, out, in) weight under the name `weight`, as the checkpoint has it."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, out_features, in_features))
