"""Nemotron-H (transformers' NemotronHForCausalLM): one mixer per layer, chosen by layers_block_type:
Mamba-2 ("linear_attention"), attention ("full_attention"), a ReLU² MLP ("mlp") or a ReLU² MoE ("moe").
Each layer is x + mixer(norm(x)); MLP and MoE layers carry no cache (kind FFN).

Mamba-2: I = mamba_num_heads · mamba_head_dim, gate-then-norm over groups of I // n_groups, eps
layer_norm_epsilon, dt clamped to the checkpoint's time_step_limit (default (0, inf): no clamp), as
NVIDIA's own Nemotron-H code and mamba_ssm's Mamba2 (dt_limit) define it, and as transformers >= 5.25
does. transformers <= 5.24 clamped to (time_step_min, inf) instead, an init-time bound that no
released checkpoint trains with (see docs/versions.md). transformers clamps only on its chunked
path, not in its one-token decode step; we clamp everywhere, as its full forward does.
Attention: no position embedding at all (NoPE), GQA, head_dim from the config, scaling head_dim**-0.5,
no biases (attention_bias is ignored, as transformers ignores it).
MoE (DeepSeek-V3's router): sigmoid scores in float32; e_score_correction_bias is added for choosing
only (groups by the sum of their two best, top topk_group groups, then top-k experts); the weights
are the chosen experts' plain scores, renormalized if norm_topk_prob, × routed_scaling_factor; the
shared experts (a ReLU² MLP) run on every token. Norms multiply the weight in float32 before the cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ScanExportError
from .registry import HYBRID_SHARPENED, SSD, Family, register
from ...moe_op import moe_experts
from ..attention import Attention
from ..config import HYBRID_SCHEMA, MAX_SMALL, ATTENTION, FFN, MAMBA2, AttentionDims, HybridConfig, Mamba2Dims, eos_id, json_float
# the family's stacking recipe: per-expert checkpoint tensors stacked as transformers does, before
# the renames (loading.stacked_tensors)
from ..expert_stacks import per_expert_stacks as stacked  # noqa: F401
from ..hybrid import HybridLM
from ..mamba_mixers import Mamba2Mixer
from ..norms import _rms_normalize

MODEL_TYPE = "nemotron_h"

# config.json fields checked before anything is built (config.check_schema): the hybrid ones, plus this family's.
SCHEMA = {**HYBRID_SCHEMA, "ssm_state_size": ("int", 1, MAX_SMALL), "mamba_num_heads": ("int", 1, MAX_SMALL),
                         "mamba_head_dim": ("int", 1, MAX_SMALL), "n_groups": ("int", 1, MAX_SMALL),
                         "conv_kernel": ("int", 2, 64), "chunk_size": ("int", 1, 1 << 14),
                         "n_routed_experts": ("int", 0, MAX_SMALL), "moe_intermediate_size": ("int", 0, 1 << 20),
                         "use_bias": ("bool", None, None), "use_conv_bias": ("bool", None, None)}
# layers_block_type values (current and legacy) -> (cache kind, mixer)
BLOCK_TYPES = {"linear_attention": (MAMBA2, "mamba"), "mamba": (MAMBA2, "mamba"),
               "full_attention": (ATTENTION, "attention"), "attention": (ATTENTION, "attention"),
               "mlp": (FFN, "mlp"), "moe": (FFN, "moe")}
# the legacy hybrid_override_pattern's characters
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
DEFAULT_BLOCKS = ("linear_attention", "moe", "full_attention", "mlp")


@dataclass(frozen=True)
class NemotronHConfig(HybridConfig):
    """HybridConfig plus each layer's mixer and the router's settings (num_experts, experts_per_token
    and intermediate_size are HybridConfig's; moe_intermediate_size is each routed expert's)."""

    mixers: tuple[str, ...] = ()  # "mamba", "attention", "mlp" or "moe" per layer
    moe_intermediate_size: int = 0
    moe_latent_size: int | None = None  # Nemotron-3's latent MoE: experts run on a down-projection of hidden
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


def block_types(raw: dict) -> tuple[list[str], str]:
    """(the per-layer block types, the field they came from), with transformers' precedence."""
    for field in ("layers_block_type", "layer_types"):
        if raw.get(field) is not None:
            types = raw[field]
            if not isinstance(types, list):
                raise ScanExportError(f"field {field!r}: expected a list of layer types, got {types!r}")
            return types, field
    pattern = raw.get("hybrid_override_pattern")
    if pattern is None:
        return list(DEFAULT_BLOCKS), "layers_block_type"
    if not isinstance(pattern, str):
        raise ScanExportError(f"field 'hybrid_override_pattern': expected a string such as 'M*-E', got {pattern!r}")
    bad = sorted({c for c in pattern if c not in PATTERN})
    if bad:
        raise ScanExportError(f"field 'hybrid_override_pattern': characters {bad} are not layer types; supported "
                              f"characters are {sorted(PATTERN)}")
    return [PATTERN[c] for c in pattern], "hybrid_override_pattern"


def config_from_hf(raw: dict) -> NemotronHConfig:
    for field, want in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
        if raw.get(field, want) != want:
            raise ScanExportError(f"field {field!r}: expected {want!r}, got {raw[field]!r}")
    latent = raw.get("moe_latent_size")
    if latent is not None and (isinstance(latent, bool) or not isinstance(latent, int) or latent < 1):
        raise ScanExportError(f"field 'moe_latent_size': expected null or a positive integer, got {latent!r}")
    types, field = block_types(raw)
    if not types:
        raise ScanExportError(f"field {field!r}: expected at least one layer, got none")
    for i, t in enumerate(types):
        if t not in BLOCK_TYPES:
            raise ScanExportError(f"field {field!r}: layer {i} is {t!r}; supported values are {sorted(BLOCK_TYPES)}")
    hidden, eps = raw["hidden_size"], raw.get("layer_norm_epsilon", 1e-5)
    heads, head_dim = raw.get("mamba_num_heads", 128), raw.get("mamba_head_dim", 64)
    groups = raw.get("n_groups", raw.get("mamba_n_groups", 8))
    if heads % groups:
        raise ScanExportError(f"fields mamba_num_heads / n_groups: expected a multiple, got {heads} / {groups}")
    mamba = Mamba2Dims(
        hidden_size=hidden, intermediate_size=heads * head_dim, state_size=raw.get("ssm_state_size", 128),
        conv_kernel=raw.get("conv_kernel", raw.get("mamba_d_conv", 4)), num_heads=heads, head_dim=head_dim,
        n_groups=groups, chunk_size=raw.get("chunk_size", raw.get("mamba_chunk_size", 128)),
        # NVIDIA's mixer and transformers >= 5.25: self.time_step_limit = config.time_step_limit
        # (mamba_dt_limit is the config's legacy spelling)
        time_step_limit=tuple(json_float(v) for v in (raw.get("time_step_limit") or raw.get("mamba_dt_limit")
                                                      or (0.0, "inf"))),
        use_bias=bool(raw.get("use_bias", False)),
        use_conv_bias=bool(raw.get("use_conv_bias", raw.get("mamba_conv_bias", True))), layer_norm_epsilon=eps)
    q_heads = raw.get("num_attention_heads", 32)
    kv = raw.get("num_key_value_heads") or q_heads
    if q_heads % kv:
        raise ScanExportError(f"fields num_attention_heads / num_key_value_heads: expected a multiple, got {q_heads} / {kv}")
    attn_dim = raw.get("head_dim") or hidden // q_heads
    experts, top_k = raw.get("n_routed_experts", 8), raw.get("num_experts_per_tok", 2)
    n_group, topk_group = raw.get("n_group", 1), raw.get("topk_group", 1)
    mixers = tuple(BLOCK_TYPES[t][1] for t in types)
    if "moe" in mixers:
        # the router scores a group by its two best experts, and picks k experts among topk_group groups
        if not (n_group >= 1 and experts % n_group == 0 and experts // n_group >= 2):
            raise ScanExportError(f"fields n_routed_experts / n_group: expected groups of at least 2 experts, "
                                  f"got {experts} / {n_group}")
        if not 1 <= topk_group <= n_group:
            raise ScanExportError(f"field 'topk_group': expected 1..{n_group} (n_group), got {topk_group}")
        if not 1 <= top_k <= topk_group * (experts // n_group):
            raise ScanExportError(f"field 'num_experts_per_tok': expected 1..{topk_group * (experts // n_group)} "
                                  f"(the experts of topk_group groups), got {top_k}")
    moe = "moe" in mixers
    return NemotronHConfig(
        model_type=MODEL_TYPE, vocab_size=raw["vocab_size"], hidden_size=hidden, num_hidden_layers=len(types),
        layer_types=tuple(BLOCK_TYPES[t][0] for t in types), rms_norm_eps=eps, mamba=mamba,
        attention=AttentionDims(num_heads=q_heads, num_kv_heads=kv, head_dim=attn_dim, scaling=attn_dim ** -0.5,
                                bias=False, rope=None),
        tie_word_embeddings=False,  # transformers never ties Nemotron-H's lm_head (_tied_weights_keys = {})
        eos_token_id=eos_id(raw), bos_token_id=raw.get("bos_token_id"),
        intermediate_size=raw.get("intermediate_size", 21504), mlp_bias=bool(raw.get("mlp_bias", False)),
        shared_intermediate_size=raw.get("moe_shared_expert_intermediate_size", 7688) if moe else 0,
        num_experts=experts if moe else 0, experts_per_token=top_k if moe else 0, mixers=mixers,
        moe_intermediate_size=raw.get("moe_intermediate_size", 7688), n_group=n_group, topk_group=topk_group,
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)), moe_latent_size=latent if moe else None,
    )


class NemotronHRMSNorm(nn.Module):
    """transformers' NemotronHRMSNorm: normalize in float32, multiply by the weight in float32, then cast."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return (self.weight.float() * _rms_normalize(x.float(), self.eps)).to(x.dtype)


class ReLU2MLP(nn.Module):
    """down(relu(up(x))²): the mlp layers and the MoE's shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class TopKRouter(nn.Module):
    """gate.weight (E, hidden) and gate.e_score_correction_bias (E,), used in float32 as transformers
    keeps them (_keep_in_fp32_modules_strict)."""

    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        # a buffer in transformers; a parameter here, so that the loaders find it by name like the rest
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)

    def forward(self, x):
        """x: (N, hidden) -> weights (N, k) float32, expert ids (N, k) int64"""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1:  # keep the topk_group groups whose two best experts sum highest
            n, per = x.shape[0], cfg.num_experts // cfg.n_group
            grouped = choice.view(n, cfg.n_group, per)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # (N, G)
            best = group_scores.topk(cfg.topk_group, dim=-1)[1]  # (N, topk_group)
            groups = torch.arange(cfg.n_group, device=x.device)
            keep = (best[..., None] == groups).any(1)  # (N, G)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).reshape(n, cfg.num_experts)
        index = choice.topk(cfg.experts_per_token, dim=-1)[1]
        weights = scores.gather(1, index)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, index


class NemotronHMoE(nn.Module):
    """gate (router), experts.up_proj (E, I, d), experts.down_proj (E, d, I), shared_experts, where d is
    hidden, or moe_latent_size with the latent projections fc1_latent_proj (hidden -> d) before the
    routed experts and fc2_latent_proj (d -> hidden) after them, as transformers computes them. The
    router and the shared experts always see the full hidden states."""

    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        d = cfg.moe_latent_size or cfg.hidden_size
        self.gate = TopKRouter(cfg)
        self.experts = nn.Module()
        self.experts.up_proj = nn.Parameter(torch.zeros(cfg.num_experts, cfg.moe_intermediate_size, d))
        self.experts.down_proj = nn.Parameter(torch.zeros(cfg.num_experts, d, cfg.moe_intermediate_size))
        self.shared_experts = ReLU2MLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.mlp_bias)
        # transformers' modules; Identity (no parameters, no graph nodes) without a latent size
        latent = cfg.moe_latent_size is not None
        self.fc1_latent_proj = nn.Linear(cfg.hidden_size, d, bias=cfg.mlp_bias) if latent else nn.Identity()
        self.fc2_latent_proj = nn.Linear(d, cfg.hidden_size, bias=cfg.mlp_bias) if latent else nn.Identity()

    def forward(self, x):
        """x: (b, l, hidden) -> (b, l, hidden)"""
        b, l, h = x.shape
        flat = x.reshape(b * l, h)
        weights, index = self.gate(flat)
        y = moe_experts(self.fc1_latent_proj(flat), index, weights.type_as(x), self.experts.up_proj,
                        self.experts.down_proj, "relu2")  # (N, d)
        return self.fc2_latent_proj(y).view(b, l, h) + self.shared_experts(x)


class NemotronHBlock(nn.Module):
    def __init__(self, cfg: NemotronHConfig, mixer: str):
        super().__init__()
        self.kind = mixer
        self.norm = NemotronHRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if mixer == "mamba":
            self.mixer = Mamba2Mixer(cfg.mamba)
        elif mixer == "attention":
            self.mixer = Attention(cfg.hidden_size, cfg.attention)
        elif mixer == "mlp":
            self.mixer = ReLU2MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        else:
            self.mixer = NemotronHMoE(cfg)

    def forward(self, x, cache, allowed, rope):
        h = self.norm(x)
        if self.kind == "mamba":
            h, *cache = self.mixer(h, *cache)
        elif self.kind == "attention":
            h, *cache = self.mixer(h, *cache, allowed, rope)
        else:
            h, cache = self.mixer(h), []
        return x + h, cache


class NemotronHLM(HybridLM):
    final_norm_name = "norm_f"

    def __init__(self, cfg: NemotronHConfig):
        mixers = iter(cfg.mixers)  # HybridLM builds layer_cls(cfg, kind) in layer order
        super().__init__(cfg, lambda cfg, kind: NemotronHBlock(cfg, next(mixers)))
        self.model.norm_f = NemotronHRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build(raw: dict) -> NemotronHLM:
    return NemotronHLM(config_from_hf(raw))


# checkpoint name -> our name: `backbone.` is transformers' `model.` (conversion_mapping "nemotron_h"),
# and HybridLM names the embeddings embed_tokens
RENAMES = (("backbone.embeddings.", "model.embed_tokens."), ("backbone.", "model."),
           ("model.embeddings.", "model.embed_tokens."))

# Mamba-2 / attention (NoPE, GQA 4:2) / ReLU² MLP / MoE (8 experts in 2 groups, top 2 within the best
# group, shared experts), one mixer per layer.
TINY_NEMOTRON_H = dict(vocab_size=256, hidden_size=64, layers_block_type=["linear_attention", "full_attention", "mlp", "moe"],
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                       mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
                       chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                       moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5,
                       tie_word_embeddings=False)


def layer_count(raw: dict) -> int:
    """The layer pattern's length: num_hidden_layers is not written, or ignored."""
    return len(block_types(raw)[0])


FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="NemotronHForCausalLM", config_class="NemotronHConfig",
                         schema=SCHEMA, config_from_hf=config_from_hf, build=build, scan=SSD, tiny=TINY_NEMOTRON_H,
                         renames=RENAMES, stacked=stacked, moe=True,
                         # its embeddings, stacked experts (up_proj, no gate) and router too
                         sharpened=HYBRID_SHARPENED + ("embeddings.weight", "experts.up_proj", "gate.weight"),
                         bench_configs={"tiny": TINY_NEMOTRON_H}, num_layers=layer_count))
