"""Mamba-1 and Mamba-2 mixers with the recurrent state as explicit inputs and outputs.

Parameter names match Hugging Face checkpoints (in_proj, conv1d, x_proj, dt_proj, A_log, D, norm,
out_proj), and the arithmetic follows transformers' slow path step for step.
Glossary: b batch, l seqlen, h hidden_size, d intermediate_size (d_inner), n state_size,
K conv_kernel, r time_step_rank.
Mamba-1 state: conv_state (b, K−1, d), ssm_state (b, n, d) (float32), both channels-last.
Mamba-2 state: conv_state (b, K−1, conv_dim), ssm_state (b, heads, head_dim, n) (float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..custom_ops import causal_conv, mamba_chunk_scan_combined, selective_scan_fn
from .activations import ACTIVATIONS
from .norms import GatedRMSNorm, weightless_rms


class MambaMixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, n, r = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * d, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(d, d, cfg.conv_kernel, groups=d, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, n))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.hidden_size, bias=cfg.use_bias)

    def dt_b_c_norms(self, dt, B, C):
        """Norms on Δ (b, l, r), B and C (b, l, n) before Δ's projection: FalconMamba's weightless
        RMS norm, none for Mamba (Jamba's mixer overrides this with weighted norms)."""
        if self.cfg.model_type == "falcon_mamba":
            return tuple(weightless_rms(t, self.cfg.mixer_rms_eps) for t in (dt, B, C))
        return dt, B, C

    def forward(self, x, conv_state, ssm_state):
        """x: (b, l, h), conv_state: (b, K−1, d), ssm_state: (b, n, d) -> (y: (b, l, h), conv_state', ssm_state')

        Activations stay (b, l, ·) around every linear layer; only the scan sees (b, d, l), and in
        the exported graph those transposes cancel against the lowering's own.
        """
        cfg = self.cfg
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d) each
        u, conv_state = causal_conv(u, conv_state, self.conv1d.weight, self.conv1d.bias)
        u = ACTIVATIONS[cfg.hidden_act](u)  # the gate z stays silu (inside selective_scan_fn), as in transformers
        dt, B, C = self.dt_b_c_norms(*self.x_proj(u).split([cfg.time_step_rank, cfg.state_size, cfg.state_size],
                                                             dim=-1))
        dt = F.linear(dt, self.dt_proj.weight)  # (b, l, d); the bias goes in as delta_bias
        y, ssm_state = selective_scan_fn(
            u.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2),
            C.transpose(1, 2), self.D.float(), z.transpose(1, 2), self.dt_proj.bias.float(), True,
            return_last_state=True, initial_state=ssm_state.transpose(1, 2),
        )
        return self.out_proj(y.transpose(1, 2).to(x.dtype)), conv_state, ssm_state.transpose(1, 2)


class Mamba2Mixer(nn.Module):
    """cfg: a MambaLMConfig (mamba2) or a config.Mamba2Dims (the Mamba-2 layers of hybrids); both
    carry the sizes read here under the same names."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.intermediate_size, cfg.num_heads
        self.in_proj = nn.Linear(cfg.hidden_size, d + cfg.conv_dim + h, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(d, d // cfg.n_groups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(d, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x, conv_state, ssm_state):
        """x: (b, l, hidden), conv_state: (b, K−1, conv_dim), ssm_state: (b, h, p, n)"""
        cfg = self.cfg
        b, l, _ = x.shape
        gn = cfg.n_groups * cfg.state_size
        gate, xBC, dt = self.in_proj(x).split([cfg.intermediate_size, cfg.conv_dim, cfg.num_heads], dim=-1)
        xBC, conv_state = causal_conv(xBC, conv_state, self.conv1d.weight, self.conv1d.bias)
        xs, B, C = ACTIVATIONS[cfg.hidden_act](xBC).split([cfg.intermediate_size, gn, gn], dim=-1)
        y, ssm_state = mamba_chunk_scan_combined(
            xs.reshape(b, l, cfg.num_heads, cfg.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, l, cfg.n_groups, cfg.state_size), C.reshape(b, l, cfg.n_groups, cfg.state_size),
            cfg.chunk_size if cfg.chunk_size <= 64 else 64, D=self.D, dt_bias=self.dt_bias,
            initial_states=ssm_state, dt_softplus=True, dt_limit=cfg.time_step_limit, return_final_states=True,
            state_dtype=torch.float32,  # the contract's ssm_state is float32 (mamba would return C's dtype)
        )
        y = self.norm(y.reshape(b, l, cfg.intermediate_size), gate)
        return self.out_proj(y.to(x.dtype)), conv_state, ssm_state


