"""Qwen3.5 text (transformers' Qwen3_5ForCausalLM, model_type qwen3_5_text) and the released multimodal
checkpoints (model_type qwen3_5, Qwen3_5ForConditionalGeneration: its text_config and the language
model's weights; the export is the language model, images and video are not inputs).

Layers (layer_types): Gated DeltaNet ("linear_attention") and gated attention ("full_attention"), each
followed by a SwiGLU MLP. Norms are zero-centred, x̂·(1 + w) in float32 (Qwen3_5RMSNorm), except the
DeltaNet's output norm, w·x̂ then ·silu(z) (norm before gate).
Gated DeltaNet, b batch, l seqlen, hk key heads, h value heads, dk / dv head dims, K conv kernel:
  conv_state (b, K−1, 2·hk·dk + h·dv) channels last, model dtype; ssm_state (b, h, dk, dv) float32,
  transformers' recurrent-state layout, so decode needs no transpose.
Gated attention: q_proj gives per head [query (d) | gate (d)]; q/k norms over head_dim before partial
RoPE; the output is multiplied by sigmoid(gate) before o_proj. Text positions only: transformers'
mRoPE with three equal position rows is plain RoPE over the first rotary_dim channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ....contract.kinds import GATED_DELTANET, CacheTensor
from ....errors import ScanExportError
from ...gated_delta_export import gated_delta_rule
from ...custom_ops import causal_conv
from .registry import GATED_DELTA, Family, register
from ..activations import ACTIVATIONS
from ..attention import apply_rope
from ..config import (ATTENTION, HYBRID_SCHEMA, MAX_SMALL, AttentionDims, HybridConfig, check_schema, eos_id,
                      rope_spec)
from ..hf_fields import attention_heads, check_activation
from ..hybrid import HybridLM
from ..residual_layer import MixerThenFeedForward
from ..mlp import GatedMLP

MODEL_TYPE = "qwen3_5_text"
MULTIMODAL_TYPE = "qwen3_5"

SCHEMA = {**HYBRID_SCHEMA, "linear_conv_kernel_dim": ("int", 2, 64), "linear_key_head_dim": ("int", 1, MAX_SMALL),
          "linear_value_head_dim": ("int", 1, MAX_SMALL), "linear_num_key_heads": ("int", 1, MAX_SMALL),
          "linear_num_value_heads": ("int", 1, MAX_SMALL)}
LAYER_TYPES = {"linear_attention": GATED_DELTANET, "full_attention": ATTENTION}


@dataclass(frozen=True)
class GatedDeltaNetDims:
    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    eps: float
    hidden_act: str = "silu"

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    # scan_export.json's intermediate_size / state_size (describe reads the config's `mamba` part)
    @property
    def intermediate_size(self) -> int:
        return self.value_dim

    @property
    def state_size(self) -> int:
        return self.head_k_dim

    def cache_tensors(self):
        return [CacheTensor("conv_state", (self.conv_kernel - 1, self.conv_dim), "model"),
                CacheTensor("ssm_state", (self.num_v_heads, self.head_k_dim, self.head_v_dim), "state")]


@dataclass(frozen=True)
class Qwen35Config(HybridConfig):
    gated_deltanet: GatedDeltaNetDims | None = None


def text_config(raw: dict) -> dict:
    """The language model's config: config.json itself (qwen3_5_text) or its text_config (qwen3_5)."""
    if raw.get("model_type") != MULTIMODAL_TYPE:
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ScanExportError(f"field 'text_config': expected the language model's config (an object), got "
                              f"{type(text).__name__}")
    # the schema's fields live in text_config here, so the top-level check saw none of them
    check_schema(text, SCHEMA)
    return {"tie_word_embeddings": raw.get("tie_word_embeddings", False), **text, "model_type": MODEL_TYPE}


def config_from_hf(raw: dict) -> Qwen35Config:
    model_type = raw.get("model_type", MODEL_TYPE)  # scan_export.json names the checkpoint's type
    raw = text_config(raw)
    check_activation(raw)
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is None:  # transformers' default: every full_attention_interval-th layer is attention
        every = raw.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise ScanExportError(f"field 'layer_types': expected {n} entries (num_hidden_layers), got {types!r}"[:200])
    kinds = []
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise ScanExportError(f"field 'layer_types': layer {i} is {t!r}; supported values are {sorted(LAYER_TYPES)}")
        kinds.append(LAYER_TYPES[t])
    eps = raw.get("rms_norm_eps", 1e-6)
    heads, kv, head_dim = attention_heads(raw)
    params = raw.get("rope_parameters") or {}
    if params.get("mrope_interleaved") is False and params.get("mrope_section") is not None:
        pass  # text positions: every mRoPE section sees the same position, so the layout does not matter
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25))
    gdn = GatedDeltaNetDims(hidden_size=raw["hidden_size"], num_k_heads=raw.get("linear_num_key_heads", 16),
                            num_v_heads=raw.get("linear_num_value_heads", 32),
                            head_k_dim=raw.get("linear_key_head_dim", 128), head_v_dim=raw.get("linear_value_head_dim", 128),
                            conv_kernel=raw.get("linear_conv_kernel_dim", 4), eps=eps,
                            hidden_act=raw.get("hidden_act", "silu"))
    if gdn.num_v_heads % gdn.num_k_heads:
        raise ScanExportError(f"field 'linear_num_value_heads': expected a multiple of linear_num_key_heads "
                              f"({gdn.num_k_heads}), got {gdn.num_v_heads}")
    return Qwen35Config(
        model_type=model_type, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_hidden_layers=n,
        layer_types=tuple(kinds), rms_norm_eps=eps, mamba=gdn, gated_deltanet=gdn,
        attention=AttentionDims(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, scaling=head_dim ** -0.5,
                                bias=bool(raw.get("attention_bias", False)), rope=rope_spec(raw, head_dim, partial)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), eos_token_id=eos_id(raw),
        bos_token_id=raw.get("bos_token_id"), intermediate_size=raw["intermediate_size"],
    )


class ZeroCentredRMSNorm(nn.Module):
    """Qwen3_5RMSNorm: x̂·(1 + w) in float32, then the input dtype (weights start at 0)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


class NormThenGate(nn.Module):
    """Qwen3_5RMSNormGated: w·x̂ in the input dtype, then ·silu(gate) in float32 (the norm first,
    unlike Mamba-2's GatedRMSNorm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, y, gate):
        dtype = y.dtype
        y32 = y.float()
        y32 = y32 / torch.sqrt(y32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y32.to(dtype) * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3_5GatedDeltaNet with its conv and delta-rule states as inputs and outputs."""

    def __init__(self, dims: GatedDeltaNetDims):
        super().__init__()
        self.dims = d = dims
        self.in_proj_qkv = nn.Linear(d.hidden_size, d.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(d.hidden_size, d.value_dim, bias=False)
        self.in_proj_b = nn.Linear(d.hidden_size, d.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(d.hidden_size, d.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(d.conv_dim, d.conv_dim, d.conv_kernel, groups=d.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(d.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(d.num_v_heads))
        self.norm = NormThenGate(d.head_v_dim, d.eps)
        self.out_proj = nn.Linear(d.value_dim, d.hidden_size, bias=False)

    def projections(self, x):
        """x: (b, l, hidden) -> qkv (b, l, conv_dim) in the conv's channel order [q | k | v], z (b, l, h·dv),
        b and a (b, l, h) (Qwen3-Next overrides this: its projections are fused per key head)."""
        return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)

    def forward(self, x, conv_state, ssm_state):
        """x: (b, l, hidden), conv_state: (b, K−1, conv_dim), ssm_state: (b, h, dk, dv) float32"""
        d = self.dims
        b, l, _ = x.shape
        qkv, z, b_logit, a = self.projections(x)
        qkv, conv_state = causal_conv(qkv, conv_state, self.conv1d.weight, None)
        q, k, v = ACTIVATIONS[d.hidden_act](qkv).split([d.key_dim, d.key_dim, d.value_dim], dim=-1)
        q = q.reshape(b, l, d.num_k_heads, d.head_k_dim)
        k = k.reshape(b, l, d.num_k_heads, d.head_k_dim)
        v = v.reshape(b, l, d.num_v_heads, d.head_v_dim)
        beta = b_logit.sigmoid()
        # float32 as transformers: in fp16, exp(A_log) · softplus could overflow to −inf
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        o, ssm_state = gated_delta_rule(q, k, v, g, beta, initial_state=ssm_state, use_qk_l2norm=True)
        z = z.reshape(b, l, d.num_v_heads, d.head_v_dim)
        y = self.norm(o.to(x.dtype), z).reshape(b, l, d.value_dim)
        return self.out_proj(y), conv_state, ssm_state.float()


class GatedAttention(nn.Module):
    """Qwen3_5Attention: GQA with q/k norms, partial RoPE and a sigmoid output gate per channel."""

    def __init__(self, hidden_size: int, dims: AttentionDims, eps: float):
        super().__init__()
        h, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.dims = dims
        self.q_proj = nn.Linear(hidden_size, 2 * h * d, bias=dims.bias)
        self.k_proj = nn.Linear(hidden_size, g * d, bias=dims.bias)
        self.v_proj = nn.Linear(hidden_size, g * d, bias=dims.bias)
        self.o_proj = nn.Linear(h * d, hidden_size, bias=dims.bias)
        self.q_norm = ZeroCentredRMSNorm(d, eps)
        self.k_norm = ZeroCentredRMSNorm(d, eps)

    def forward(self, x, past_key, past_value, allowed, rope):
        """x: (b, l, hidden), past_key/value: (b, g, p, d), allowed: (b, 1, 1, l, T) -> (y, key, value: (b, g, T, d))"""
        dims = self.dims
        b, l, _ = x.shape
        h, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        r = h // g
        q, gate = self.q_proj(x).view(b, l, h, 2 * d).chunk(2, dim=-1)  # (b, l, h, d) each
        q = self.q_norm(q).transpose(1, 2)  # (b, h, l, d)
        k = self.k_norm(self.k_proj(x).view(b, l, g, d)).transpose(1, 2)  # (b, g, l, d)
        v = self.v_proj(x).view(b, l, g, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        # as attention.Attention.attend: query heads g·r + i share kv head g, no repeated cache
        scores = torch.matmul(q.reshape(b, g, r * l, d), key.transpose(2, 3)) * dims.scaling  # (b, g, r·l, T)
        scores = torch.where(allowed, scores.view(b, g, r, l, -1), torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        y = torch.matmul(probs.view(b, g, r * l, -1), value)  # (b, g, r·l, d)
        y = y.view(b, h, l, d).transpose(1, 2).reshape(b, l, h * d)
        return self.o_proj(y * torch.sigmoid(gate.reshape(b, l, h * d))), key, value


class Qwen35Layer(MixerThenFeedForward):
    MIXER_NORM, MIXER, FFN_NORM, FFN = "input_layernorm", "linear_attn", "post_attention_layernorm", "mlp"

    def __init__(self, cfg: Qwen35Config, kind: str):
        super().__init__()
        self.input_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == GATED_DELTANET:
            self.linear_attn = GatedDeltaNet(cfg.gated_deltanet)
        else:
            self.self_attn = GatedAttention(cfg.hidden_size, cfg.attention, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)


class Qwen35LM(HybridLM):
    def __init__(self, cfg: Qwen35Config):
        super().__init__(cfg, Qwen35Layer)
        self.model.norm = ZeroCentredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build(raw: dict) -> Qwen35LM:
    return Qwen35LM(config_from_hf(raw))


def hf_states(cache, description: dict):
    """transformers' Qwen3.5 cache in our order: per DeltaNet layer conv (HF (b, c, K), ours the last
    K−1 columns channels-last) and the recurrent state (the same layout as ours); per attention
    layer key, value."""
    out = []
    for entry in description["state"]:
        layer = entry["layer"]
        if entry["kind"] == GATED_DELTANET:
            out += [cache.get_conv_state(layer).double().numpy()[..., 1:].transpose(0, 2, 1),
                    cache.get_recurrent_state(layer).double().numpy()]
        else:
            out += [cache.layers[layer].keys.double().numpy(), cache.layers[layer].values.double().numpy()]
    return out


# Qwen3_5ForCausalLM's names are ours; the released multimodal checkpoints keep the language model
# under model.language_model. (and the vision tower under model.visual., which nothing here reads)
RENAMES: tuple[tuple[str, str], ...] = ()
MULTIMODAL_RENAMES = (("model.language_model.", "model."),)

TINY_QWEN3_5 = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, intermediate_size=96, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                    tie_word_embeddings=False)
SHARPENED = ("_proj.weight", "in_proj_qkv.weight", "in_proj_z.weight", "in_proj_a.weight", "in_proj_b.weight",
             "embed_tokens.weight", "lm_head.weight")

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="Qwen3_5ForCausalLM", config_class="Qwen3_5TextConfig",
                         schema=SCHEMA, config_from_hf=config_from_hf, build=build, scan=GATED_DELTA,
                         tiny=TINY_QWEN3_5, renames=RENAMES, sharpened=SHARPENED, hf_states=hf_states))

# The released checkpoints: the language model above under model.language_model., a vision tower
# beside it (model.visual., not read). The tiny one has a two-block vision tower so that
# transformers can build Qwen3_5ForConditionalGeneration, the verify referee.
TINY_QWEN3_5_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, num_position_embeddings=64)
TINY_QWEN3_5_MULTIMODAL = dict(text_config=TINY_QWEN3_5, vision_config=TINY_QWEN3_5_VISION, tie_word_embeddings=False)

# the top level's own fields; text_config's are checked against SCHEMA as it is read (text_config())
MULTIMODAL_SCHEMA = {"tie_word_embeddings": ("bool", None, None)}
MULTIMODAL_FAMILY = register(Family(model_type=MULTIMODAL_TYPE, hf_class="Qwen3_5ForConditionalGeneration",
                                    config_class="Qwen3_5Config",
                                    schema=MULTIMODAL_SCHEMA, config_from_hf=config_from_hf,
                                    build=build, scan=GATED_DELTA, tiny=TINY_QWEN3_5_MULTIMODAL,
                                    renames=MULTIMODAL_RENAMES, sharpened=SHARPENED, hf_states=hf_states,
                                    num_layers=lambda raw: text_config(raw).get("num_hidden_layers")))
