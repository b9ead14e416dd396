"""Qwen3-Next (transformers' Qwen3NextForCausalLM): Qwen3.5's layers (qwen3_5.py: Gated DeltaNet,
gated attention, zero-centred norms) with the DeltaNet's projections fused per key head, and a
mixture of experts after the mixer (every decoder_sparse_step-th layer not in mlp_only_layers;
a SwiGLU MLP elsewhere): softmax over all experts in float32, the top k renormalised
(norm_topk_prob), plus a shared expert scaled by sigmoid(shared_expert_gate(x)).
in_proj_qkvz: (hk · (2·dk + 2·r·dv), hidden), per key head [q | k | v (r heads) | z (r heads)],
r = h / hk; in_proj_ba: (hk · 2r, hidden), per key head [b (r) | a (r)]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ScanExportError
from ...moe_op import moe_experts
from . import qwen3_5
from .qwen3_5 import GATED_DELTANET, GatedAttention, GatedDeltaNet, ZeroCentredRMSNorm
from .registry import GATED_DELTA, Family, register
from ..config import MAX_SMALL
from ..expert_stacks import per_expert_stacks
from ..hybrid import HybridLM
from ..mlp import GatedMLP

MODEL_TYPE = "qwen3_next"

SCHEMA = {**qwen3_5.SCHEMA, "num_experts": ("int", 0, MAX_SMALL), "moe_intermediate_size": ("int", 1, 1 << 20),
          "shared_expert_intermediate_size": ("int", 0, 1 << 20), "decoder_sparse_step": ("int", 1, MAX_SMALL),
          "norm_topk_prob": ("bool", None, None)}


def config_from_hf(raw: dict):
    cfg = qwen3_5.config_from_hf({**raw, "model_type": MODEL_TYPE})
    n, experts = cfg.num_hidden_layers, raw.get("num_experts", 512)
    top_k, step = raw.get("num_experts_per_tok", 10), raw.get("decoder_sparse_step", 1)
    only = raw.get("mlp_only_layers") or []
    moe = tuple(experts > 0 and i not in only and (i + 1) % step == 0 for i in range(n))
    if any(moe) and not (isinstance(top_k, int) and not isinstance(top_k, bool) and 0 < top_k <= experts):
        raise ScanExportError(f"field 'num_experts_per_tok': expected 1..{experts} (num_experts), got {top_k!r}")
    if any(moe) and raw.get("hidden_act", "silu") != "silu":
        raise ScanExportError(f"field 'hidden_act': the experts take silu, got {raw.get('hidden_act')!r}")
    base = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f not in ("num_experts", "experts_per_token")}
    return Qwen3NextConfig(**base, moe_layers=moe,
                           moe_intermediate_size=raw.get("moe_intermediate_size", 512),
                           shared_intermediate=raw.get("shared_expert_intermediate_size", 512),
                           norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
                           **{"num_experts": experts if any(moe) else 0, "experts_per_token": top_k if any(moe) else 0})


from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class Qwen3NextConfig(qwen3_5.Qwen35Config):
    moe_layers: tuple[bool, ...] = ()
    moe_intermediate_size: int = 0
    shared_intermediate: int = 0
    norm_topk_prob: bool = True


class FusedGatedDeltaNet(GatedDeltaNet):
    """Qwen3NextGatedDeltaNet: the same recurrence, its projections fused per key head."""

    def __init__(self, dims):
        super().__init__(dims)
        d = dims
        del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a
        self.in_proj_qkvz = nn.Linear(d.hidden_size, 2 * d.key_dim + 2 * d.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(d.hidden_size, 2 * d.num_v_heads, bias=False)

    def projections(self, x):
        d = self.dims
        b, l, _ = x.shape
        r = d.num_v_heads // d.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(b, l, d.num_k_heads, -1)
        q, k, v, z = qkvz.split([d.head_k_dim, d.head_k_dim, r * d.head_v_dim, r * d.head_v_dim], dim=-1)
        beta, a = self.in_proj_ba(x).view(b, l, d.num_k_heads, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([t.reshape(b, l, -1) for t in (q, k, v)], dim=-1)  # (b, l, conv_dim), the conv's order
        return qkv, z.reshape(b, l, d.value_dim), beta.reshape(b, l, -1), a.reshape(b, l, -1)


class SparseMoe(nn.Module):
    """Qwen3NextSparseMoeBlock: gate.weight (E, hidden), experts.gate_up_proj (E, 2·I, hidden) gate
    rows first, experts.down_proj (E, hidden, I), shared_expert (a SwiGLU MLP), shared_expert_gate (1, hidden)."""

    def __init__(self, cfg: Qwen3NextConfig):
        super().__init__()
        h, E = cfg.hidden_size, cfg.num_experts
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.zeros(E, h))
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * cfg.moe_intermediate_size, h))
        self.experts.down_proj = nn.Parameter(torch.zeros(E, h, cfg.moe_intermediate_size))
        self.shared_expert = GatedMLP(h, cfg.shared_intermediate)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        self.top_k, self.renorm = cfg.experts_per_token, cfg.norm_topk_prob

    def forward(self, x):
        b, l, h = x.shape
        flat = x.reshape(b * l, h)
        probs = torch.softmax(F.linear(flat, self.gate.weight), dim=-1, dtype=torch.float32)
        weights, index = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.renorm:
            weights = weights / weights.sum(-1, keepdim=True)
        routed = moe_experts(flat, index, weights.to(x.dtype), self.experts.gate_up_proj, self.experts.down_proj)
        shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return (routed + shared).reshape(b, l, h)


class Qwen3NextLayer(qwen3_5.Qwen35Layer):
    def __init__(self, cfg: Qwen3NextConfig, kind: str, index: int):
        nn.Module.__init__(self)
        self.input_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == GATED_DELTANET:
            self.linear_attn = FusedGatedDeltaNet(cfg.gated_deltanet)
        else:
            self.self_attn = GatedAttention(cfg.hidden_size, cfg.attention, cfg.rms_norm_eps)
        self.mlp = SparseMoe(cfg) if cfg.moe_layers[index] else GatedMLP(cfg.hidden_size, cfg.intermediate_size)


class Qwen3NextLM(HybridLM):
    def __init__(self, cfg: Qwen3NextConfig):
        indices = iter(range(cfg.num_hidden_layers))
        super().__init__(cfg, lambda c, kind: Qwen3NextLayer(c, kind, next(indices)))
        self.model.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build(raw: dict) -> Qwen3NextLM:
    return Qwen3NextLM(config_from_hf(raw))


TINY_QWEN3_NEXT = dict(qwen3_5.TINY_QWEN3_5, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[2])

# the tiny checkpoint's sharpened matrices: Qwen3.5's, the fused DeltaNet projections, the router and the
# experts (per expert in the saved file, stacked in transformers' module)
SHARPENED = qwen3_5.SHARPENED + ("in_proj_qkvz.weight", "in_proj_ba.weight", "gate.weight", "gate_up_proj", "down_proj",
                                 "shared_expert_gate.weight")

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="Qwen3NextForCausalLM", config_class="Qwen3NextConfig",
                         schema=SCHEMA, config_from_hf=config_from_hf, build=build, scan=GATED_DELTA,
                         tiny=TINY_QWEN3_NEXT, sharpened=SHARPENED,
                         moe=True, stacked=per_expert_stacks, hf_states=qwen3_5.hf_states))
