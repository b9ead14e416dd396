"""Feed-forward blocks: SwiGLU MLPs under the names each family's checkpoints use."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS


class GatedMLP(nn.Module):
    """down(act(gate(x)) · up(x)): bamba's feed_forward (gate_proj, up_proj, down_proj); act is
    transformers' ACT2FN[hidden_act] (silu in every released checkpoint; gelu in its model testers)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """The same SwiGLU with gate and up in one matrix, gate first: granite's shared_mlp
    (input_linear: (2·I, hidden), output_linear: (hidden, I))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.input_linear = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.output_linear = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate) * up)
