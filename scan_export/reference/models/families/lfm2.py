"""LFM2 (transformers' Lfm2ForCausalLM): layers that are each a gated short convolution ("conv") or
GQA attention with per-head q/k RMSNorm and RoPE ("full_attention"), each followed by a SwiGLU MLP
(w1, w3, w2), pre-norms operator_norm / ffn_norm, the final norm embedding_norm, tied embeddings by
default.

The short convolution: in_proj -> B, C, x (each (b, l, hidden)); B·x; a depthwise causal conv1d of
kernel conv_L_cache without activation; C·conv; out_proj. Its cache is the conv's last K−1 inputs,
conv_state (b, K−1, hidden) channels last, as the Mamba mixers keep theirs (reference/conv.py), so
it reuses their conv (custom_ops.causal_conv) and their lowering.

transformers zeroes padded positions before the conv (apply_mask_to_padding_states). We never see
padding inside a conv: the hosts prefill each group of equal length apart and left-pad only KV
caches when they stack sequences (attention.py), as for every Mamba mixer here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ....contract.kinds import ATTENTION, SHORTCONV, shortconv_cache
from ....errors import ScanExportError
from .registry import HYBRID_SHARPENED, NO_SCAN, Family, register
from ..attention import Attention
from ..config import HYBRID_SCHEMA, MAX_SMALL, AttentionDims, HybridConfig, eos_id, rope_spec
from ..hf_fields import attention_heads
from ..hybrid import HybridLM
from ..residual_layer import MixerThenFeedForward
from ..norms import RMSNorm
from ...custom_ops import causal_conv

MODEL_TYPE = "lfm2"

# transformers' layer_types names -> our kinds
LAYER_TYPES = {"conv": SHORTCONV, "full_attention": ATTENTION}

SCHEMA = {
    **HYBRID_SCHEMA, "norm_eps": ("num", 0, 1), "conv_L_cache": ("int", 2, 64), "conv_bias": ("bool", None, None),
    "block_multiple_of": ("int", 1, 1 << 20), "block_ffn_dim_multiplier": ("num", 0, 64),
    "block_auto_adjust_ff_dim": ("bool", None, None), "block_ff_dim": ("int", 0, 1 << 20),
    "tie_embedding": ("bool", None, None),
}


@dataclass(frozen=True)
class ShortConvDims:
    """A gated short convolution's sizes: the conv runs over hidden_size channels."""

    hidden_size: int
    conv_kernel: int
    bias: bool  # conv_bias: in_proj, the conv and out_proj all take it

    # scan_export.json's Mamba fields (describe_hybrid reads them from cfg.mamba): the conv's width,
    # and no scan state.
    @property
    def intermediate_size(self) -> int:
        return self.hidden_size

    state_size = 0

    def cache_tensors(self):
        return shortconv_cache((self.conv_kernel - 1, self.hidden_size))


@dataclass(frozen=True)
class Lfm2HybridConfig(HybridConfig):
    """HybridConfig with the short convolution's part (kinds.KIND_PARTS[SHORTCONV] reads `shortconv`)."""

    shortconv: ShortConvDims | None = None


def layer_kinds(raw: dict) -> tuple[str, ...]:
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is None:  # Lfm2Config: full_attn_idxs, all layers attention when absent too
        idxs = raw.get("full_attn_idxs")
        idxs = list(range(n)) if idxs is None else idxs
        types = ["full_attention" if i in idxs else "conv" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise ScanExportError(f"field 'layer_types': expected a list of {n} (num_hidden_layers) names, got {types!r}"[:200])
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise ScanExportError(f"field 'layer_types': expected each of {sorted(LAYER_TYPES)}, got {t!r} at layer {i}")
    return tuple(LAYER_TYPES[t] for t in types)


def ff_dim(raw: dict) -> int:
    """Lfm2MLP's width: intermediate_size, auto-adjusted to 2/3, × block_ffn_dim_multiplier, rounded up
    to block_multiple_of (transformers applies the multiplier and rounding only with a multiplier)."""
    size = raw.get("intermediate_size") or raw.get("block_ff_dim") or 12288
    if raw.get("block_auto_adjust_ff_dim", True):
        size = int(2 * size / 3)
        mult = raw.get("block_ffn_dim_multiplier", 1.0)
        if mult is not None:
            of = raw.get("block_multiple_of", 256)
            size = of * ((int(mult * size) + of - 1) // of)
    if size < 1:
        raise ScanExportError(f"field 'intermediate_size': expected a feed-forward width >= 1 after "
                              f"block_auto_adjust_ff_dim, got {size}")
    return size


def config_from_hf(raw: dict) -> Lfm2HybridConfig:
    n, hidden = raw["num_hidden_layers"], raw["hidden_size"]
    kinds = layer_kinds(raw)
    eps = raw.get("norm_eps", 1e-5)
    heads, kv, head_dim = attention_heads(raw)
    if head_dim > MAX_SMALL:
        raise ScanExportError(f"field 'head_dim': expected at most {MAX_SMALL}, got {head_dim}")
    rope_raw = raw
    if not raw.get("rope_parameters") and "rope_theta" not in raw:
        rope_raw = {**raw, "rope_theta": 1e6}  # Lfm2Config.default_theta, not RoPE's usual 10000
    conv = ShortConvDims(hidden_size=hidden, conv_kernel=raw.get("conv_L_cache", 3), bias=bool(raw.get("conv_bias", False)))
    tied = raw.get("tie_word_embeddings", raw.get("tie_embedding", True))
    return Lfm2HybridConfig(
        model_type=MODEL_TYPE, vocab_size=raw["vocab_size"], hidden_size=hidden, num_hidden_layers=n,
        layer_types=kinds, rms_norm_eps=eps,
        mamba=conv,  # describe_hybrid's conv fields; the layers read `shortconv`
        shortconv=conv,
        attention=AttentionDims(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, scaling=head_dim ** -0.5,
                                bias=False, rope=rope_spec(rope_raw, head_dim)),
        tie_word_embeddings=bool(tied), eos_token_id=eos_id(raw), bos_token_id=raw.get("bos_token_id"),
        intermediate_size=ff_dim(raw),
    )


class ShortConv(nn.Module):
    """Lfm2ShortConv: x: (b, l, hidden), conv_state: (b, K−1, hidden) -> (y: (b, l, hidden), conv_state')."""

    def __init__(self, dims: ShortConvDims):
        super().__init__()
        d, k = dims.hidden_size, dims.conv_kernel
        self.in_proj = nn.Linear(d, 3 * d, bias=dims.bias)
        self.conv = nn.Conv1d(d, d, k, groups=d, bias=dims.bias)  # weight: (d, 1, K), the checkpoint's
        self.out_proj = nn.Linear(d, d, bias=dims.bias)

    def forward(self, x, conv_state):
        B, C, u = self.in_proj(x).chunk(3, dim=-1)  # (b, l, d) each: transformers' order
        y, conv_state = causal_conv(B * u, conv_state, self.conv.weight, self.conv.bias)
        return self.out_proj(C * y), conv_state


class Lfm2Attention(Attention):
    """attention.Attention with RMSNorm over each head's q and k (before RoPE, as transformers does),
    its output projection under the checkpoint's name out_proj."""

    def __init__(self, hidden_size: int, dims: AttentionDims, eps: float):
        super().__init__(hidden_size, dims)
        # the checkpoint calls it out_proj; Attention.attend calls self.o_proj (the property below)
        self.out_proj = self._modules.pop("o_proj")
        self.q_layernorm = RMSNorm(dims.head_dim, eps)
        self.k_layernorm = RMSNorm(dims.head_dim, eps)

    @property
    def o_proj(self):
        return self.out_proj

    def forward(self, x, past_key, past_value, allowed, rope):
        """x: (b, l, hidden) -> (y, key, value) as Attention.forward"""
        b, l, _ = x.shape
        d = self.dims.head_dim
        q = self.q_layernorm(self.q_proj(x).view(b, l, -1, d)).reshape(b, l, -1)  # (b, l, h·d)
        k = self.k_layernorm(self.k_proj(x).view(b, l, -1, d)).reshape(b, l, -1)  # (b, l, g·d)
        return self.attend(q, k, self.v_proj(x), past_key, past_value, allowed, rope)


class SwiGLU(nn.Module):
    """Lfm2MLP: w2(silu(w1(x)) · w3(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Lfm2Layer(MixerThenFeedForward):
    MIXER_NORM, MIXER, FFN_NORM, FFN = "operator_norm", "conv", "ffn_norm", "feed_forward"

    def __init__(self, cfg: Lfm2HybridConfig, kind: str):
        super().__init__()
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == SHORTCONV:
            self.conv = ShortConv(cfg.shortconv)
        else:
            self.self_attn = Lfm2Attention(cfg.hidden_size, cfg.attention, cfg.rms_norm_eps)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.intermediate_size)


class Lfm2LM(HybridLM):
    final_norm_name = "embedding_norm"

    def __init__(self, cfg: Lfm2HybridConfig):
        super().__init__(cfg, Lfm2Layer)


def build(raw: dict) -> Lfm2LM:
    return Lfm2LM(config_from_hf(raw))


# checkpoint name -> our name (none: the modules above carry the checkpoint's names)
RENAMES: tuple[tuple[str, str], ...] = ()

# 4 layers: conv, attention, conv, attention (both kinds before and after the other), GQA 4:2;
# intermediate_size 100 -> int(2·100/3) = 66 -> rounded up to 80 (block_multiple_of 16), so the
# auto-adjustment is exercised. Tied embeddings (LFM2's default); tests untie them.
TINY_LFM2 = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=100, block_multiple_of=16, block_ffn_dim_multiplier=1.0,
                 block_auto_adjust_ff_dim=True, conv_L_cache=3,
                 layer_types=["conv", "full_attention", "conv", "full_attention"], tie_word_embeddings=True)

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="Lfm2ForCausalLM", config_class="Lfm2Config", schema=SCHEMA,
                         config_from_hf=config_from_hf, build=build, scan=NO_SCAN, tiny=TINY_LFM2, renames=RENAMES,
                         sharpened=(*HYBRID_SHARPENED, "w1.weight", "w2.weight", "w3.weight"),
                         bench_configs={"tiny": TINY_LFM2}))
