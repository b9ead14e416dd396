"""GraniteMoeHybrid (transformers' GraniteMoeHybridForCausalLM, Granite 4.0-H): Mamba-2 and attention
layers (layer_types), each followed by a shared SwiGLU MLP plus, when num_local_experts > 0, a
top-k MoE. Granite's scalings: embeddings × embedding_multiplier, each residual branch ×
residual_multiplier, attention scores × attention_multiplier (instead of head_dim**-0.5), logits ÷
logits_scaling. RoPE only with position_embedding_type "rope" (then over the whole head)."""

from __future__ import annotations

from torch import nn

from ....errors import ScanExportError
from .registry import SSD, TINY_HYBRID, Family, register
from ..attention import Attention
from ..hf_fields import attention_heads, check_activation, mamba2_dims
from ..config import HYBRID_SCHEMA, MAMBA2, AttentionDims, HybridConfig, eos_id, layer_kinds, rope_spec
from ..hybrid import HybridLM
from ..mamba_mixers import Mamba2Mixer
from ..mlp import FusedGatedMLP
from ..moe import TopKMoE
from ..norms import RMSNorm

MODEL_TYPE = "granitemoehybrid"

# config.json fields checked before anything is built (config.check_schema): the hybrid ones, plus this family's.
SCHEMA = {**HYBRID_SCHEMA, "shared_intermediate_size": ("int", 0, 1 << 20), "embedding_multiplier": ("num", 0, 1e6),
                         "residual_multiplier": ("num", 0, 1e6), "logits_scaling": ("num", 0, 1e6),
                         "attention_multiplier": ("num", 0, 1e6)}
POSITION_EMBEDDING_TYPES = (None, "rope", "nope")


def config_from_hf(raw: dict) -> HybridConfig:
    check_activation(raw)
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types") or raw.get("layers_block_type") or ["mamba"] * n
    if len(types) != n:
        raise ScanExportError(f"field 'layer_types': expected {n} entries (num_hidden_layers), got {len(types)}")
    position = raw.get("position_embedding_type")
    if position not in POSITION_EMBEDDING_TYPES:
        raise ScanExportError(f"field 'position_embedding_type': expected one of {list(POSITION_EMBEDDING_TYPES)}, "
                              f"got {position!r}")
    eps = raw.get("rms_norm_eps", 1e-6)
    heads, kv, head_dim = attention_heads(raw)
    rope = None
    if position == "rope":
        # transformers' granite default RoPE spans the whole head whatever partial_rotary_factor says.
        rope_type = (raw.get("rope_parameters") or {}).get("rope_type", "default")
        rope = rope_spec(raw, head_dim, 1.0 if rope_type == "default" else None)
    experts = raw.get("num_local_experts", 8) or 0
    top_k = raw.get("num_experts_per_tok", 2) or 0
    if experts and not 0 < top_k <= experts:
        raise ScanExportError(f"field 'num_experts_per_tok': expected 1..{experts} (num_local_experts), got {top_k}")
    return HybridConfig(
        model_type=MODEL_TYPE, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_hidden_layers=n,
        layer_types=layer_kinds(types, "layer_types"), rms_norm_eps=eps, mamba=mamba2_dims(raw, eps),
        attention=AttentionDims(num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                                scaling=float(raw.get("attention_multiplier", 1.0)),
                                bias=bool(raw.get("attention_bias", False)), rope=rope),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), eos_token_id=eos_id(raw),
        bos_token_id=raw.get("bos_token_id"), intermediate_size=raw["intermediate_size"],
        shared_intermediate_size=raw.get("shared_intermediate_size", 1024), num_experts=experts,
        experts_per_token=top_k, embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
        logits_scaling=float(raw.get("logits_scaling", 1.0)),
    )


class GraniteMoeHybridLayer(nn.Module):
    def __init__(self, cfg: HybridConfig, kind: str):
        super().__init__()
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == MAMBA2:
            self.mamba = Mamba2Mixer(cfg.mamba)
        else:
            self.self_attn = Attention(cfg.hidden_size, cfg.attention)
        if cfg.num_experts:
            self.block_sparse_moe = TopKMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                                            cfg.experts_per_token)
        self.shared_mlp = FusedGatedMLP(cfg.hidden_size, cfg.shared_intermediate_size)

    def _residual(self, x, h):
        return x + (h * self.residual_multiplier if self.residual_multiplier != 1.0 else h)

    def forward(self, x, cache, allowed, rope):
        h = self.input_layernorm(x)
        if hasattr(self, "mamba"):
            h, *cache = self.mamba(h, *cache)
        else:
            h, *cache = self.self_attn(h, *cache, allowed, rope)
        x = self._residual(x, h)
        h = self.post_attention_layernorm(x)
        ffn = self.shared_mlp(h)
        if hasattr(self, "block_sparse_moe"):
            ffn = self.block_sparse_moe(h) + ffn
        return self._residual(x, ffn), cache


class GraniteMoeHybridLM(HybridLM):
    final_norm_name = "norm"

    def __init__(self, cfg: HybridConfig):
        super().__init__(cfg, GraniteMoeHybridLayer)


def build(raw: dict) -> GraniteMoeHybridLM:
    return GraniteMoeHybridLM(config_from_hf(raw))


# transformers' in-memory names (conversion_mapping "granitemoe") -> the checkpoint names we keep
RENAMES = (("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
           ("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight"),
           ("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight"))

TINY_GRANITE = dict(TINY_HYBRID, intermediate_size=32, shared_intermediate_size=48, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=["mamba", "attention", "mamba", "mamba"],
                    position_embedding_type="rope", embedding_multiplier=12.0, logits_scaling=4.0,
                    residual_multiplier=0.5, attention_multiplier=0.125)
# Shaped like ibm-granite/granite-4.0-h-micro's blocks at 130m scale (random weights, for benchmarks only):
# 24 layers with attention every 6th, 24 Mamba-2 heads of 64, d_state 128; MoE with 8 experts, top 2.
GRANITE_130M = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, num_attention_heads=12,
                    num_key_value_heads=4, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
                    mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, intermediate_size=512,
                    shared_intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2,
                    layer_types=["attention" if i % 6 == 5 else "mamba" for i in range(24)],
                    position_embedding_type=None, tie_word_embeddings=True)
# The MoE bench: GRANITE_130M's layers, 6 of them, with 8 and with 32 experts at the same top-2 (the
# 24-layer model with 32 experts, 0.9 G parameters, runs the exporter out of 23 GB of memory).
GRANITE_MOE_8E = dict(GRANITE_130M, num_hidden_layers=6, layer_types=["mamba"] * 5 + ["attention"])
GRANITE_MOE_32E = dict(GRANITE_MOE_8E, num_local_experts=32)

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="GraniteMoeHybridForCausalLM",
                         config_class="GraniteMoeHybridConfig", schema=SCHEMA, config_from_hf=config_from_hf,
                         build=build, scan=SSD, tiny=TINY_GRANITE, renames=RENAMES, moe=True,
                         bench_configs={"tiny": TINY_GRANITE, "130m": GRANITE_130M, "moe-8e": GRANITE_MOE_8E,
                                        "moe-32e": GRANITE_MOE_32E}))
