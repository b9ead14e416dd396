"""Jamba (transformers' JambaForCausalLM, AI21): Mamba-1 layers and attention layers
(layer i is attention iff i % attn_layer_period == attn_layer_offset), each followed by a SwiGLU MLP
or, iff i % expert_layer_period == expert_layer_offset, a mixture of experts.

Mamba-1 mixer: transformers' MambaMixer plus RMS norms with weights on Δ, B and C (dt_layernorm,
b_layernorm, c_layernorm, eps rms_norm_eps) before Δ's projection; its state is the Mamba-1 exports'
(channels last: conv (b, K−1, d), ssm (b, n, d) float32). Attention: GQA with no position encoding
at all, scaling head_dim**-0.5, no biases. MoE: softmax over all experts in float32, then the top k
with their probabilities as weights, NOT renormalised; no shared expert.

Checkpoints store each expert's gate_proj / up_proj / down_proj; transformers stacks them at load
(conversion_mapping "jamba"): gate_up_proj (E, 2·I, hidden) = per expert [gate; up], down_proj
(E, hidden, I): expert_stacks.per_expert_stacks says how, for both loaders (loading.stacked_tensors).

hidden_act (transformers' ACT2FN name) is the activation after the Mamba conv and the gate
activation of the MLPs and experts: silu in released checkpoints, gelu in transformers' model
tester; the Mamba output gate is silu whatever it says. The experts take silu or gelu (moe_op).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ScanExportError
from .registry import SELECTIVE_SCAN, Family, register
from ...moe_op import moe_experts
from ..attention import Attention
from ..activations import read_activation
from ..hf_fields import attention_heads
from ..config import HYBRID_SCHEMA, MAX_SMALL, ATTENTION, MAMBA1, AttentionDims, HybridConfig, Mamba1Dims, eos_id
# the family's stacking recipe: per-expert checkpoint tensors stacked as transformers does, before
# the renames (loading.stacked_tensors)
from ..expert_stacks import per_expert_stacks as stacked  # noqa: F401
from ..hybrid import HybridLM
from ..mamba_mixers import MambaMixer
from ..mlp import GatedMLP
from ..norms import RMSNorm
from ..residual_layer import MixerThenFeedForward

MODEL_TYPE = "jamba"
# hidden_act -> the experts' moe_op activation (the gate's function; the experts compute nothing else)
EXPERT_GATES = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_python": "geglu"}

# config.json fields checked before anything is built (config.check_schema): the hybrid ones, plus this family's.
SCHEMA = {**HYBRID_SCHEMA, "mamba_dt_rank": ("rank", 1, 1 << 17), "num_experts": ("int", 0, MAX_SMALL)}


@dataclass(frozen=True)
class JambaConfig(HybridConfig):
    moe_layers: tuple[bool, ...] = ()  # per layer: a mixture of experts (else a SwiGLU MLP)


def _period(raw: dict, period_field: str, offset_field: str, default: tuple[int, int]) -> tuple[int, int]:
    period, offset = raw.get(period_field, default[0]), raw.get(offset_field, default[1])
    if not isinstance(period, int) or period < 1:
        raise ScanExportError(f"field {period_field!r}: expected a positive integer, got {period!r}")
    if not isinstance(offset, int) or not 0 <= offset < period:
        raise ScanExportError(f"field {offset_field!r}: expected an integer in [0, {period}) ({period_field}), "
                              f"got {offset!r}")
    return period, offset


def config_from_hf(raw: dict) -> JambaConfig:
    act = read_activation(raw, "hidden_act", "silu")
    n, hidden = raw["num_hidden_layers"], raw["hidden_size"]
    attn_period, attn_offset = _period(raw, "attn_layer_period", "attn_layer_offset", (8, 4))
    expert_period, expert_offset = _period(raw, "expert_layer_period", "expert_layer_offset", (2, 1))
    # num_local_experts is JambaConfig's alias of num_experts (attribute_map)
    experts = raw.get("num_experts", raw.get("num_local_experts", 16))
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise ScanExportError(f"field 'num_experts': expected a positive integer, got {experts!r}")
    top_k = raw.get("num_experts_per_tok", 2)
    moe = [i % expert_period == expert_offset for i in range(n)] if experts > 1 else [False] * n
    if any(moe) and not (isinstance(top_k, int) and 0 < top_k <= experts):
        raise ScanExportError(f"field 'num_experts_per_tok': expected 1..{experts} (num_experts), got {top_k!r}")
    if any(moe) and act not in EXPERT_GATES:
        raise ScanExportError(f"field 'hidden_act': the experts take one of {sorted(EXPERT_GATES)}, got {act!r}")
    rank = raw.get("mamba_dt_rank", "auto")
    rank = -(-hidden // 16) if rank == "auto" else rank
    if not isinstance(rank, int) or rank < 1:
        raise ScanExportError(f"field 'mamba_dt_rank': expected a positive integer or 'auto', got {rank!r}")
    expand = raw.get("mamba_expand", 2)
    mamba = Mamba1Dims(hidden_size=hidden, intermediate_size=int(expand * hidden),
                       state_size=raw.get("mamba_d_state", 16), conv_kernel=raw.get("mamba_d_conv", 4),
                       time_step_rank=rank, use_bias=bool(raw.get("mamba_proj_bias", False)),
                       use_conv_bias=bool(raw.get("mamba_conv_bias", True)), hidden_act=act)
    heads, kv, head_dim = attention_heads(raw)
    return JambaConfig(
        model_type=MODEL_TYPE, vocab_size=raw["vocab_size"], hidden_size=hidden, num_hidden_layers=n,
        layer_types=tuple(ATTENTION if i % attn_period == attn_offset else MAMBA1 for i in range(n)),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), mamba=mamba,
        attention=AttentionDims(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, scaling=head_dim ** -0.5,
                                bias=False, rope=None),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), eos_token_id=eos_id(raw),
        bos_token_id=raw.get("bos_token_id"), intermediate_size=raw.get("intermediate_size", 14336),
        num_experts=experts if any(moe) else 0, experts_per_token=top_k if any(moe) else 0, moe_layers=tuple(moe),
    )


class JambaMambaMixer(MambaMixer):
    """The Mamba-1 mixer (one scan node, the Mamba-1 exports' lowering) with Jamba's weighted RMS
    norms on Δ (b, l, r), B and C (b, l, n)."""

    def __init__(self, dims: Mamba1Dims, eps: float):
        super().__init__(dims)
        self.dt_layernorm = RMSNorm(dims.time_step_rank, eps)
        self.b_layernorm = RMSNorm(dims.state_size, eps)
        self.c_layernorm = RMSNorm(dims.state_size, eps)

    def dt_b_c_norms(self, dt, B, C):
        return self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)


class JambaExperts(nn.Module):
    """transformers' in-memory names: gate_up_proj (E, 2·I, hidden), gate rows first; down_proj (E, hidden, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))


class JambaRouter(nn.Module):
    """router.weight: (E, hidden). Softmax over all E logits in float32, then the k largest
    probabilities, not renormalised (transformers' JambaTopKRouter)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.top_k = top_k

    def forward(self, x):
        """x: (N, hidden) -> weights (N, k) in x's dtype, expert ids (N, k) int64"""
        probs = torch.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        weights, index = probs.topk(self.top_k, dim=-1)
        return weights.to(x.dtype), index


class JambaMoE(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.router = JambaRouter(cfg.hidden_size, cfg.num_experts, cfg.experts_per_token)
        self.experts = JambaExperts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size)
        self.activation = EXPERT_GATES[cfg.mamba.hidden_act]  # hidden_act: one field for all

    def forward(self, x):
        """x: (b, l, hidden) -> (b, l, hidden)"""
        b, l, h = x.shape
        flat = x.reshape(b * l, h)
        weights, index = self.router(flat)
        return moe_experts(flat, index, weights, self.experts.gate_up_proj, self.experts.down_proj,
                           self.activation).view(b, l, h)


class JambaLayer(MixerThenFeedForward):
    """r + mixer(input_layernorm(r)), then + feed_forward(pre_ff_layernorm(·)); the mixer is Mamba-1 or attention."""

    def __init__(self, cfg: JambaConfig, kind: str, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == MAMBA1:
            self.mamba = JambaMambaMixer(cfg.mamba, cfg.rms_norm_eps)
        else:
            self.self_attn = Attention(cfg.hidden_size, cfg.attention)
        act = cfg.mamba.hidden_act
        self.feed_forward = JambaMoE(cfg) if moe else GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=act)


class JambaLM(HybridLM):
    final_norm_name = "final_layernorm"

    def __init__(self, cfg: JambaConfig):
        moe = iter(cfg.moe_layers)
        super().__init__(cfg, lambda c, kind: JambaLayer(c, kind, next(moe)))


def build(raw: dict) -> JambaLM:
    return JambaLM(config_from_hf(raw))


# checkpoint name -> our name (none: our modules carry transformers' in-memory names)
RENAMES: tuple[tuple[str, str], ...] = ()

# The tiny Jamba: Mamba-1 layers 0, 2 and attention layers 1, 3 (period 2, offset 1), MoE with 4
# experts top-2 in layers 1, 3 (period 2, offset 1), dense SwiGLU MLPs in 0, 2; GQA 4:2, no RoPE.
TINY_JAMBA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8,
                  mamba_d_conv=4, mamba_expand=2, tie_word_embeddings=False)

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="JambaForCausalLM", config_class="JambaConfig", schema=SCHEMA,
                         config_from_hf=config_from_hf, build=build, scan=SELECTIVE_SCAN, tiny=TINY_JAMBA,
                         renames=RENAMES, stacked=stacked, moe=True,
                         # a Mamba-1 mixer's output (D·u gated by silu(z)) is a few times weaker than an
                         # MLP's at the same init, and a late Mamba layer would barely move the tokens
                         sharpen_gains={"mamba.out_proj.weight": 3.0}, bench_configs={"tiny": TINY_JAMBA}))
