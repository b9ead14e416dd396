"""Bamba (transformers' BambaForCausalLM): Mamba-2 layers and attention layers (attn_layer_indices),
each followed by a SwiGLU MLP. Attention: GQA, RoPE on the first half of each head
(partial_rotary_factor 0.5 unless rope_parameters says otherwise), scaling head_dim**-0.5."""

from __future__ import annotations


from ....errors import ScanExportError
from .registry import SSD, TINY_HYBRID, Family, register
from ..attention import Attention
from ..config import HYBRID_SCHEMA, ATTENTION, MAMBA2, AttentionDims, HybridConfig, eos_id, rope_spec
from ..hf_fields import attention_heads, check_activation, mamba2_dims
from ..hybrid import HybridLM
from ..mamba_mixers import Mamba2Mixer
from ..mlp import GatedMLP
from ..norms import RMSNorm
from ..residual_layer import MixerThenFeedForward

MODEL_TYPE = "bamba"

# config.json fields checked before anything is built (config.check_schema): the hybrid ones, plus this family's.
SCHEMA = HYBRID_SCHEMA


def config_from_hf(raw: dict) -> HybridConfig:
    check_activation(raw)
    n = raw["num_hidden_layers"]
    indices = raw.get("attn_layer_indices") or []
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ScanExportError(f"field 'attn_layer_indices': expected layer indices in [0, {n}), got {bad}")
    eps = raw.get("rms_norm_eps", 1e-5)
    heads, kv, head_dim = attention_heads(raw)
    # BambaConfig hardcodes partial_rotary_factor 0.5 unless rope_parameters names one.
    partial = (raw.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5)
    return HybridConfig(
        model_type=MODEL_TYPE, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_hidden_layers=n,
        layer_types=tuple(ATTENTION if i in indices else MAMBA2 for i in range(n)), rms_norm_eps=eps,
        mamba=mamba2_dims(raw, eps),
        attention=AttentionDims(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, scaling=head_dim ** -0.5,
                                bias=bool(raw.get("attention_bias", False)), rope=rope_spec(raw, head_dim, partial)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), eos_token_id=eos_id(raw),
        bos_token_id=raw.get("bos_token_id"), intermediate_size=raw["intermediate_size"],
        mlp_bias=bool(raw.get("mlp_bias", False)),
    )


class BambaLayer(MixerThenFeedForward):
    def __init__(self, cfg: HybridConfig, kind: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == MAMBA2:
            self.mamba = Mamba2Mixer(cfg.mamba)
        else:
            self.self_attn = Attention(cfg.hidden_size, cfg.attention)
        self.feed_forward = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)


class BambaLM(HybridLM):
    final_norm_name = "final_layernorm"

    def __init__(self, cfg: HybridConfig):
        super().__init__(cfg, BambaLayer)


def build(raw: dict) -> BambaLM:
    return BambaLM(config_from_hf(raw))


# checkpoint name -> our name (none: bamba's checkpoints use the module names above)
RENAMES: tuple[tuple[str, str], ...] = ()

TINY_BAMBA = dict(TINY_HYBRID, intermediate_size=96, attn_layer_indices=[1])

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="BambaForCausalLM", config_class="BambaConfig", schema=SCHEMA,
                         config_from_hf=config_from_hf, build=build, scan=SSD, tiny=TINY_BAMBA, renames=RENAMES,
                         bench_configs={"tiny": TINY_BAMBA}))
