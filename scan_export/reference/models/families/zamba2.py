"""Zamba2 (transformers' Zamba2ForCausalLM): Mamba-2 layers ("linear_attention") and hybrid layers
("hybrid") that first run a SHARED transformer block on [hidden state | original embeddings], then
their own Mamba-2 layer on the hidden state plus that block's output (through a per-layer linear).

  e = embed(ids); x = e
  mamba layer:   x = x + mamba(norm(x))                                   (no MLP)
  hybrid layer j (the j-th hybrid layer, block = shared block j % num_mem_blocks):
                 t = block.input_layernorm(cat([x, e], -1))               (b, l, 2·hidden)
                 t = block.self_attn(t; adapter j)                         (b, l, hidden)
                 t = block.feed_forward(block.pre_ff_layernorm(t); adapter j)   (no residual in the block)
                 x = x + mamba(norm(x + linear(t)))                        (the residual is x, not x + t)
Attention: input 2·hidden, head_dim = 2·hidden / heads, scores × (head_dim / 2)**-0.5, no biases,
RoPE over the whole head only with use_mem_rope. Each hybrid layer has its own KV cache (the block's
weights are shared, its keys are not): a hybrid layer carries conv, ssm, key, value, config.PARALLEL.
Adapters (LoRA-like, each hybrid layer its own, stored inside its shared block at list index j):
q/k/v += up(down(t)) with use_shared_attention_adapter; the MLP's gate_up_proj always has one.
MLP: down(gelu(g) · u), [g | u] = gate_up_proj(t) + adapter(t). Mamba-2: SiLU, conv bias always,
in/out_proj bias add_bias_linear, gated norm (gate, then norm) with eps 1e-5 whatever rms_norm_eps,
dt clamped to (time_step_min, inf) (transformers' chunked path; its one-token decode step does not clamp).
Read and ignored, as transformers 5.24 ignores them: use_long_context (it only sets
max_position_embeddings), use_conv_bias, use_mem_eff_path, use_mamba_kernels; there is no switch for
the MLP adapters (a use_shared_mlp_adapter in older config.json files is not read by transformers either).

Sharing: as in transformers, hybrid layer j's `shared_transformer` IS block j % num_mem_blocks (one
module object), so named_parameters() lists each shared tensor once, under the first hybrid layers'
names: exactly the names save_pretrained writes (it drops the tied copies). Both loaders
(loading.py, onnx/fake_params.fake_model) go by those names, so the export stores each once.
transformers 5.24 ties the blocks only when tie_word_embeddings is true (PreTrainedModel.
get_expanded_tied_weights_keys returns no ties otherwise): an untied Zamba2 runs a block of its own
in every hybrid layer, read from that layer's names (with block_id j % num_mem_blocks deciding which
adapter entries it holds). We do the same, so the model is the one transformers runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ScanExportError
from .registry import SSD, Family, register
from ..attention import Attention
from ..config import HYBRID_SCHEMA, MAMBA2, PARALLEL, AttentionDims, HybridConfig, Mamba2Dims, eos_id, json_float, rope_spec
from ..hybrid import HybridLM
from ..mamba_mixers import Mamba2Mixer
from ..norms import RMSNorm

MODEL_TYPE = "zamba2"

# config.json fields checked before anything is built (config.check_schema): the hybrid ones, plus this family's.
SCHEMA = {**HYBRID_SCHEMA, "add_bias_linear": ("bool", None, None), "use_mem_rope": ("bool", None, None),
                         "use_shared_attention_adapter": ("bool", None, None)}
# transformers' name for the layer that runs the shared block, then its Mamba-2 mixer
HYBRID = "hybrid"
GATED_NORM_EPS = 1e-5  # Zamba2MambaMixer hard-codes it (not rms_norm_eps)
ACTIVATIONS = ("gelu",)  # the shared MLP's act (exact erf GELU); every released Zamba2 uses it
# transformers' layer type names (legacy "mamba" included) -> our kinds; a hybrid layer carries conv, ssm, key, value
LAYER_TYPES = {"linear_attention": MAMBA2, "mamba": MAMBA2, HYBRID: PARALLEL}


@dataclass(frozen=True)
class Zamba2Config(HybridConfig):
    """HybridConfig plus the shared blocks: how many, and which adapters they hold."""

    num_mem_blocks: int = 1
    use_shared_attention_adapter: bool = False
    adapter_rank: int = 0

    @property
    def shares_blocks(self) -> bool:
        """Whether hybrid layers share their blocks: transformers ties them only with tied embeddings."""
        return self.tie_word_embeddings

    @property
    def hybrid_layer_ids(self) -> list[int]:
        return [i for i, k in enumerate(self.layer_types) if k == PARALLEL]


def _positive(raw: dict, field: str, default) -> int:
    v = raw.get(field, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ScanExportError(f"field {field!r}: expected a positive integer, got {v!r}")
    return v


def config_from_hf(raw: dict) -> Zamba2Config:
    hidden, n = raw["hidden_size"], raw["num_hidden_layers"]
    act = raw.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ScanExportError(f"field 'hidden_act': expected one of {list(ACTIVATIONS)}, got {act!r}")
    raw_types = raw.get("layers_block_type") or raw.get("layer_types")
    if raw_types is None:
        raise KeyError("layers_block_type")  # save_pretrained always writes it; the 54-layer default is not guessed
    if not isinstance(raw_types, list) or len(raw_types) != n:
        raise ScanExportError(f"field 'layers_block_type': expected a list of num_hidden_layers = {n} layer types, "
                              f"got {raw_types!r}")
    types = tuple(LAYER_TYPES.get(t) for t in raw_types)
    if None in types:
        i = types.index(None)
        raise ScanExportError(f"field 'layers_block_type': layer {i} is {raw_types[i]!r}; supported values are "
                              f"{sorted(LAYER_TYPES)}")
    # Mamba-2 mixer
    heads = _positive(raw, "n_mamba_heads", 8)
    d_inner = int(raw.get("mamba_expand", 2) * hidden)
    if d_inner % heads:
        raise ScanExportError(f"field 'n_mamba_heads': expected a divisor of mamba_expand * hidden_size = {d_inner}, "
                              f"got {heads}")
    groups = _positive(raw, "mamba_ngroups", 1)
    if heads % groups:
        raise ScanExportError(f"field 'mamba_ngroups': expected a divisor of n_mamba_heads ({heads}), got {groups}")
    bias = bool(raw.get("add_bias_linear", False))
    mamba = Mamba2Dims(hidden_size=hidden, intermediate_size=d_inner, state_size=raw.get("mamba_d_state", 64),
                       conv_kernel=raw.get("mamba_d_conv", 4), num_heads=heads, head_dim=d_inner // heads,
                       n_groups=groups, chunk_size=raw.get("chunk_size", 256),
                       time_step_limit=(json_float(raw.get("time_step_min", 0.001)), float("inf")),
                       use_bias=bias, use_conv_bias=True, layer_norm_epsilon=GATED_NORM_EPS)
    # the shared block's attention: 2·hidden wide
    attn_heads = _positive(raw, "num_attention_heads", 32)
    kv = raw.get("num_key_value_heads") or attn_heads
    if (2 * hidden) % attn_heads:
        raise ScanExportError(f"field 'num_attention_heads': expected a divisor of 2 * hidden_size = {2 * hidden}, "
                              f"got {attn_heads}")
    if attn_heads % kv:
        raise ScanExportError(f"fields num_attention_heads / num_key_value_heads: expected a multiple, got "
                              f"{attn_heads} / {kv}")
    adapters = bool(raw.get("use_shared_attention_adapter", False))
    if adapters and kv != attn_heads:  # the k/v adapters output 2·hidden = heads · head_dim
        raise ScanExportError(f"field 'num_key_value_heads': expected num_attention_heads = {attn_heads} with "
                              f"use_shared_attention_adapter (its k/v adapters are 2 * hidden_size wide), got {kv}")
    head_dim = 2 * hidden // attn_heads
    rope = None
    if raw.get("use_mem_rope", False):
        # Zamba2RotaryEmbedding's default RoPE spans the whole head (it reads no partial_rotary_factor)
        rope_type = (raw.get("rope_parameters") or {}).get("rope_type", "default")
        rope = rope_spec(raw, head_dim, 1.0 if rope_type == "default" else None)
    return Zamba2Config(
        model_type=MODEL_TYPE, vocab_size=raw["vocab_size"], hidden_size=hidden, num_hidden_layers=n,
        layer_types=types, rms_norm_eps=raw.get("rms_norm_eps", 1e-5), mamba=mamba,
        attention=AttentionDims(num_heads=attn_heads, num_kv_heads=kv, head_dim=head_dim,
                                scaling=(head_dim / 2) ** -0.5, bias=False, rope=rope),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)), eos_token_id=eos_id(raw),
        bos_token_id=raw.get("bos_token_id"), intermediate_size=raw.get("intermediate_size") or 4 * hidden,
        mlp_bias=bias, num_mem_blocks=_positive(raw, "num_mem_blocks", 1), use_shared_attention_adapter=adapters,
        adapter_rank=_positive(raw, "adapter_rank", 128),
    )


def adapter_list(cfg: Zamba2Config, block_id: int, width: int, out: int) -> nn.ModuleList:
    """transformers' adapter lists: one entry per hybrid layer j, a real down/up pair where
    j % num_mem_blocks == block_id (the layers that run this block), nn.Identity elsewhere."""
    n = len(cfg.hybrid_layer_ids)
    return nn.ModuleList(
        nn.Sequential(nn.Linear(width, cfg.adapter_rank, bias=False), nn.Linear(cfg.adapter_rank, out, bias=False))
        if j % cfg.num_mem_blocks == block_id else nn.Identity() for j in range(n))


class SharedAttention(Attention):
    """Attention over 2·hidden with hybrid layer j's q/k/v adapters (use_shared_attention_adapter)."""

    def __init__(self, cfg: Zamba2Config, block_id: int):
        super().__init__(2 * cfg.hidden_size, cfg.attention)
        self.o_proj = nn.Linear(cfg.attention.num_heads * cfg.attention.head_dim, cfg.hidden_size, bias=False)
        if cfg.use_shared_attention_adapter:
            width = 2 * cfg.hidden_size
            self.linear_q_adapter_list = adapter_list(cfg, block_id, width, width)
            self.linear_k_adapter_list = adapter_list(cfg, block_id, width, width)
            self.linear_v_adapter_list = adapter_list(cfg, block_id, width, width)

    def forward(self, x, past_key, past_value, allowed, rope, j: int):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "linear_q_adapter_list"):
            q = q + self.linear_q_adapter_list[j](x)
            k = k + self.linear_k_adapter_list[j](x)
            v = v + self.linear_v_adapter_list[j](x)
        return self.attend(q, k, v, past_key, past_value, allowed, rope)


class SharedMLP(nn.Module):
    """down(gelu(g) · u), [g | u] = gate_up_proj(t) + hybrid layer j's adapter(t)."""

    def __init__(self, cfg: Zamba2Config, block_id: int):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.gate_up_proj_adapter_list = adapter_list(cfg, block_id, h, 2 * i)

    def forward(self, x, j: int):
        gate, up = (self.gate_up_proj(x) + self.gate_up_proj_adapter_list[j](x)).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate) * up)


class SharedBlock(nn.Module):
    """transformers' Zamba2AttentionDecoderLayer: norm over 2·hidden, attention, norm, MLP; no residuals."""

    def __init__(self, cfg: Zamba2Config, block_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(2 * cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SharedAttention(cfg, block_id)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = SharedMLP(cfg, block_id)

    def forward(self, x, embeddings, past_key, past_value, allowed, rope, j: int):
        """x, embeddings: (b, l, hidden) -> (t: (b, l, hidden), key, value)"""
        t = self.input_layernorm(torch.cat([x, embeddings], dim=-1))  # (b, l, 2·hidden): x first
        t, key, value = self.self_attn(t, past_key, past_value, allowed, rope, j)
        return self.feed_forward(self.pre_ff_layernorm(t), j), key, value


class MambaLayer(nn.Module):
    """x + mamba(input_layernorm(x + t)); t is the shared block's output (hybrid layers) or absent."""

    def __init__(self, cfg: Zamba2Config):
        super().__init__()
        self.mamba = Mamba2Mixer(cfg.mamba)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, conv_state, ssm_state, t=None):
        y, conv_state, ssm_state = self.mamba(self.input_layernorm(x if t is None else x + t), conv_state, ssm_state)
        return x + y, conv_state, ssm_state


class HybridLayer(nn.Module):
    """The j-th hybrid layer: `block` is shared with every hybrid layer j' ≡ j (mod num_mem_blocks)."""

    def __init__(self, cfg: Zamba2Config, block: SharedBlock, j: int):
        super().__init__()
        self.j = j
        self.shared_transformer = block
        self.linear = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.mamba_decoder = MambaLayer(cfg)

    def forward(self, x, embeddings, cache, allowed, rope):
        conv_state, ssm_state, past_key, past_value = cache
        t, key, value = self.shared_transformer(x, embeddings, past_key, past_value, allowed, rope, self.j)
        x, conv_state, ssm_state = self.mamba_decoder(x, conv_state, ssm_state, self.linear(t))
        return x, [conv_state, ssm_state, key, value]


class Zamba2LM(HybridLM):
    final_norm_name = "final_layernorm"

    def __init__(self, cfg: Zamba2Config):
        n_blocks = min(cfg.num_mem_blocks, len(cfg.hybrid_layer_ids)) if cfg.shares_blocks else 0
        blocks = [SharedBlock(cfg, b) for b in range(n_blocks)]
        hybrid_rank = iter(range(len(cfg.hybrid_layer_ids)))

        def make_layer(cfg, kind):
            if kind == MAMBA2:
                return MambaLayer(cfg)
            j = next(hybrid_rank)
            block = blocks[j % cfg.num_mem_blocks] if cfg.shares_blocks else SharedBlock(cfg, j % cfg.num_mem_blocks)
            return HybridLayer(cfg, block, j)

        super().__init__(cfg, make_layer)

    def run_layer(self, layer, x, embeddings, cache, allowed, rope):
        """The hybrid layers take the embeddings too (transformers' original_hidden_states); the Mamba
        layers are called as Mamba mixers are, (x, *state)."""
        if isinstance(layer, HybridLayer):
            return layer(x, embeddings, cache, allowed, rope)
        x, *new = layer(x, *cache)
        return x, new


def build(raw: dict) -> Zamba2LM:
    return Zamba2LM(config_from_hf(raw))


# checkpoint name -> our name (none: the module names above are transformers')
RENAMES: tuple[tuple[str, str], ...] = ()

# 3 hybrid layers over 2 shared blocks (layers 1 and 4 share block 0: the tying and the per-layer
# adapters both matter), attention adapters (kv = heads), RoPE. Tied embeddings: transformers ties the
# shared blocks only then (untied, every hybrid layer has its own copy).
TINY_ZAMBA2 = dict(vocab_size=256, hidden_size=64, num_hidden_layers=5,
                   layers_block_type=["linear_attention", "hybrid", "hybrid", "linear_attention", "hybrid"],
                   mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=8, mamba_ngroups=1, chunk_size=16,
                   num_attention_heads=4, intermediate_size=96, num_mem_blocks=2, use_shared_attention_adapter=True,
                   adapter_rank=8, use_mem_rope=True, tie_word_embeddings=True)

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="Zamba2ForCausalLM", config_class="Zamba2Config", schema=SCHEMA,
                         config_from_hf=config_from_hf, build=build, scan=SSD, tiny=TINY_ZAMBA2, renames=RENAMES,
                         # the shared attention (scores × (head_dim/2)**-0.5 over q, k plus their adapters)
                         # turns peaky at the full scale: transformers' own float32 logits then sit 1.7e-4
                         # off its float64 ones on TINY_ZAMBA2; with these, 3e-6
                         sharpen_factors=(("adapter_list", 0.3), ("q_proj", 0.5), ("k_proj", 0.5), ("gate_up_proj", 0.7)),
                         bench_configs={"tiny": TINY_ZAMBA2}))
