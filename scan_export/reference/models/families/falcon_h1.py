"""Falcon-H1 (transformers' FalconH1ForCausalLM): every layer runs a Mamba-2 mixer and GQA attention
side by side on the same normed input and adds both to the residual, then a SwiGLU MLP.

µP multipliers, each applied where transformers applies it (none folded into weights, so the
checkpoint's tensors stream into the export unchanged and every product rounds as transformers'):
  embeddings × embedding_multiplier; logits × lm_head_multiplier
  Mamba:     in_proj(x · ssm_in_multiplier) · mup, mup = ssm_multipliers over [z | x | B | C | dt];
             output × ssm_out_multiplier
  attention: input × attention_in_multiplier; k_proj(·) × key_multiplier (before RoPE, so the KV
             cache holds scaled keys); output × attention_out_multiplier; scores × head_dim**-0.5
  MLP:       down(up(x) · act(gate(x) · mlp_multipliers[0])) · mlp_multipliers[1]
act is ACT2FN[hidden_act] (silu in released checkpoints, gelu in transformers' model tester), as is
the activation after the Mamba conv (one field, kept as mamba.hidden_act); the Mamba output is gated
by silu(z) whatever hidden_act says and, with mamba_rms_norm, group-normed before the gate
(mamba_norm_before_gate, transformers' default) or after it; d_inner is mamba_d_ssm when set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ScanExportError
from .registry import SSD, Family, register
from ...custom_ops import causal_conv, mamba_chunk_scan_combined
from ..attention import Attention
from ..activations import ACTIVATIONS, read_activation
from ..hf_fields import attention_heads
from ..config import HYBRID_SCHEMA, PARALLEL, AttentionDims, HybridConfig, Mamba2Dims, eos_id, json_float, rope_spec
from ..hybrid import HybridLM
from ..mlp import GatedMLP
from ..norms import RMSNorm, _rms_normalize

MODEL_TYPE = "falcon_h1"

# config.json fields checked before anything is built (config.check_schema): the hybrid ones, plus this family's.
SCHEMA = {**HYBRID_SCHEMA, "mamba_d_ssm": ("int", 1, 1 << 20), "projectors_bias": ("bool", None, None)}


@dataclass(frozen=True)
class FalconH1Config(HybridConfig):
    """HybridConfig plus Falcon-H1's own fields (µP multipliers, the Mamba gate's norm)."""

    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    mlp_multipliers: tuple[float, float] = (1.0, 1.0)  # gate, down
    ssm_multipliers: tuple[float, ...] = (1.0,) * 5  # z, x, B, C, dt
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = True
    projectors_bias: bool = False  # the Mamba out_proj's bias


def _floats(raw: dict, field: str, n: int) -> tuple[float, ...]:
    values = raw.get(field)
    if values is None:
        return (1.0,) * n
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ScanExportError(f"field {field!r}: expected a list of {n} numbers, got {values!r}")
    return tuple(float(v) for v in values)


def _scalar(raw: dict, field: str) -> float:
    v = raw.get(field)
    return 1.0 if v is None else float(v)


def mamba_dims(raw: dict, eps: float, hidden_act: str = "silu") -> Mamba2Dims:
    """FalconH1Mixer's sizes: d_inner = mamba_d_ssm (default 1024), or mamba_expand · hidden when null."""
    hidden = raw["hidden_size"]
    d_ssm = raw.get("mamba_d_ssm", 1024)
    d_inner = int(raw.get("mamba_expand", 2) * hidden) if d_ssm is None else int(d_ssm)
    heads = raw.get("mamba_n_heads", 128)
    head_dim = raw.get("mamba_d_head", "auto")
    head_dim = d_inner // heads if head_dim in ("auto", None) else head_dim
    if head_dim * heads != d_inner:
        raise ScanExportError(f"fields mamba_d_head * mamba_n_heads: expected mamba_d_ssm = {d_inner}, "
                              f"got {head_dim} * {heads}")
    groups = raw.get("mamba_n_groups", 1)
    if heads % groups or d_inner % groups:
        raise ScanExportError(f"field 'mamba_n_groups': expected a divisor of mamba_n_heads ({heads}) and "
                              f"mamba_d_ssm ({d_inner}), got {groups}")
    limit = raw.get("time_step_limit") or (0.0, "inf")
    return Mamba2Dims(hidden_size=hidden, intermediate_size=d_inner, state_size=raw.get("mamba_d_state", 256),
                      conv_kernel=raw.get("mamba_d_conv", 4), num_heads=heads, head_dim=head_dim, n_groups=groups,
                      chunk_size=raw.get("mamba_chunk_size", 256), time_step_limit=tuple(json_float(v) for v in limit),
                      use_bias=bool(raw.get("mamba_proj_bias", False)),
                      use_conv_bias=bool(raw.get("mamba_conv_bias", True)), layer_norm_epsilon=eps,
                      hidden_act=hidden_act)


def config_from_hf(raw: dict) -> FalconH1Config:
    act = read_activation(raw, "hidden_act", "silu")  # FalconH1Mixer's conv and FalconH1MLP's gate
    n = raw["num_hidden_layers"]
    eps = raw.get("rms_norm_eps", 1e-5)
    heads, kv, head_dim = attention_heads(raw)  # head_dim: config.json's when present (real checkpoints set it)
    # transformers' default RoPE spans the whole head (it reads no partial_rotary_factor).
    rope_type = (raw.get("rope_parameters") or {}).get("rope_type", "default")
    return FalconH1Config(
        model_type=MODEL_TYPE, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_hidden_layers=n,
        layer_types=(PARALLEL,) * n, rms_norm_eps=eps, mamba=mamba_dims(raw, eps, act),
        attention=AttentionDims(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, scaling=head_dim ** -0.5,
                                bias=bool(raw.get("attention_bias", False)),
                                rope=rope_spec(raw, head_dim, 1.0 if rope_type == "default" else None)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), eos_token_id=eos_id(raw),
        bos_token_id=raw.get("bos_token_id"), intermediate_size=raw["intermediate_size"],
        mlp_bias=bool(raw.get("mlp_bias", False)), embedding_multiplier=_scalar(raw, "embedding_multiplier"),
        lm_head_multiplier=_scalar(raw, "lm_head_multiplier"), key_multiplier=_scalar(raw, "key_multiplier"),
        attention_in_multiplier=_scalar(raw, "attention_in_multiplier"),
        attention_out_multiplier=_scalar(raw, "attention_out_multiplier"),
        ssm_in_multiplier=_scalar(raw, "ssm_in_multiplier"), ssm_out_multiplier=_scalar(raw, "ssm_out_multiplier"),
        mlp_multipliers=_floats(raw, "mlp_multipliers", 2), ssm_multipliers=_floats(raw, "ssm_multipliers", 5),
        mamba_rms_norm=bool(raw.get("mamba_rms_norm", False)),
        mamba_norm_before_gate=bool(raw.get("mamba_norm_before_gate", True)),
        projectors_bias=bool(raw.get("projectors_bias", False)),
    )


def _scaled(y, multiplier: float):
    return y if multiplier == 1.0 else y * multiplier


class ScaledLinear(nn.Linear):
    """nn.Linear whose output is multiplied by a constant (µP): the weight keeps its checkpoint name
    and values, and the product rounds as transformers' `proj(x) * multiplier` does."""

    def __init__(self, in_features: int, out_features: int, bias: bool, multiplier: float):
        super().__init__(in_features, out_features, bias=bias)
        self.multiplier = multiplier

    def forward(self, x):
        return _scaled(super().forward(x), self.multiplier)


class FalconGatedNorm(nn.Module):
    """transformers' FalconH1RMSNormGated, group size d_inner / n_groups, in float32 throughout:
    norm_before_gate: (w · norm(y)) · silu(z); else w · norm(y · silu(z)). Returns y's dtype."""

    def __init__(self, size: int, group_size: int, eps: float, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, y, gate):
        dtype = y.dtype
        if not self.norm_before_gate:
            y = y * F.silu(gate.float())
        y = y.float()
        *lead, last = y.shape
        y = _rms_normalize(y.reshape(*lead, last // self.group_size, self.group_size), self.eps)
        y = self.weight * y.reshape(*lead, last)  # the weight in its dtype times float32: float32
        if self.norm_before_gate:
            y = y * F.silu(gate.float())
        return y.to(dtype)


class FalconH1Mixer(nn.Module):
    """Mamba-2 with Falcon-H1's µP multipliers and optional gated norm.
    x: (b, l, hidden), conv_state: (b, K−1, conv_dim), ssm_state: (b, h, p, n) float32."""

    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        m = self.dims = cfg.mamba
        self.ssm_in_multiplier = cfg.ssm_in_multiplier
        self.ssm_multipliers = cfg.ssm_multipliers
        d, h = m.intermediate_size, m.num_heads
        self.in_proj = nn.Linear(m.hidden_size, d + m.conv_dim + h, bias=m.use_bias)
        self.conv1d = nn.Conv1d(m.conv_dim, m.conv_dim, m.conv_kernel, groups=m.conv_dim, bias=m.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        if cfg.mamba_rms_norm:
            self.norm = FalconGatedNorm(d, d // m.n_groups, cfg.rms_norm_eps, cfg.mamba_norm_before_gate)
        self.out_proj = nn.Linear(d, m.hidden_size, bias=cfg.projectors_bias)

    def mup_vector(self, dtype) -> torch.Tensor | None:
        """transformers' compute_mup_vector: (d + conv_dim + h,), ssm_multipliers over [z | x | B | C | dt].
        Made here, not in __init__: the memory-lean export builds the model under fake tensors
        (onnx/fake_params.py), where a buffer would have no values; in the graph it is a folded constant."""
        if all(v == 1.0 for v in self.ssm_multipliers):
            return None
        m = self.dims
        gn = m.n_groups * m.state_size
        sizes = (m.intermediate_size, m.intermediate_size, gn, gn, m.num_heads)
        return torch.cat([torch.full((s,), v, dtype=dtype) for s, v in zip(sizes, self.ssm_multipliers)])

    def forward(self, x, conv_state, ssm_state):
        m = self.dims
        b, l, _ = x.shape
        gn = m.n_groups * m.state_size
        zxbcdt = self.in_proj(_scaled(x, self.ssm_in_multiplier))
        mup = self.mup_vector(zxbcdt.dtype)
        if mup is not None:
            zxbcdt = zxbcdt * mup
        gate, xBC, dt = zxbcdt.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        xBC, conv_state = causal_conv(xBC, conv_state, self.conv1d.weight, self.conv1d.bias)
        xs, B, C = ACTIVATIONS[m.hidden_act](xBC).split([m.intermediate_size, gn, gn], dim=-1)
        y, ssm_state = mamba_chunk_scan_combined(
            xs.reshape(b, l, m.num_heads, m.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, l, m.n_groups, m.state_size), C.reshape(b, l, m.n_groups, m.state_size),
            m.chunk_size if m.chunk_size <= 64 else 64, D=self.D, dt_bias=self.dt_bias,
            initial_states=ssm_state, dt_softplus=True, dt_limit=m.time_step_limit, return_final_states=True,
            state_dtype=torch.float32,
        )
        y = y.reshape(b, l, m.intermediate_size)
        y = self.norm(y, gate) if hasattr(self, "norm") else y * F.silu(gate)
        return self.out_proj(y.to(x.dtype)), conv_state, ssm_state


class FalconH1Layer(nn.Module):
    """r + ssm_out · mamba(n) + attn_out · attention(attn_in · n), n = input_layernorm(r); then the MLP."""

    def __init__(self, cfg: FalconH1Config, kind: str):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mamba = FalconH1Mixer(cfg)
        self.self_attn = Attention(cfg.hidden_size, cfg.attention)
        a = cfg.attention
        self.self_attn.k_proj = ScaledLinear(cfg.hidden_size, a.num_kv_heads * a.head_dim, a.bias, cfg.key_multiplier)
        gate_m, down_m = cfg.mlp_multipliers
        self.feed_forward = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.mamba.hidden_act)
        ff = self.feed_forward
        ff.gate_proj = ScaledLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, gate_m)
        ff.down_proj = ScaledLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, down_m)

    def forward(self, x, cache, allowed, rope):
        cfg = self.cfg
        conv_state, ssm_state, past_key, past_value = cache
        h = self.input_layernorm(x)
        m, conv_state, ssm_state = self.mamba(h, conv_state, ssm_state)
        a, key, value = self.self_attn(_scaled(h, cfg.attention_in_multiplier), past_key, past_value, allowed, rope)
        x = x + (_scaled(m, cfg.ssm_out_multiplier) + _scaled(a, cfg.attention_out_multiplier))
        x = x + self.feed_forward(self.pre_ff_layernorm(x))
        return x, [conv_state, ssm_state, key, value]


class FalconH1LM(HybridLM):
    final_norm_name = "final_layernorm"

    def __init__(self, cfg: FalconH1Config):
        super().__init__(cfg, FalconH1Layer)

    def forward(self, input_ids, attention_mask, *cache):
        logits, *present = super().forward(input_ids, attention_mask, *cache)
        return (_scaled(logits, self.cfg.lm_head_multiplier), *present)


def build(raw: dict) -> FalconH1LM:
    return FalconH1LM(config_from_hf(raw))


# checkpoint name -> our name (none: Falcon-H1's checkpoints use the module names above)
RENAMES: tuple[tuple[str, str], ...] = ()

# Every layer runs Mamba-2 and attention in parallel. mamba_d_ssm set (its default is 1024), head_dim
# set apart from hidden / heads (real checkpoints do), and every µP multiplier ≠ 1.
TINY_FALCON_H1 = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, mamba_d_ssm=96, mamba_n_heads=8,
                      mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=True,
                      tie_word_embeddings=False, embedding_multiplier=5.0, lm_head_multiplier=0.5,
                      mlp_multipliers=[0.5, 2.0], key_multiplier=0.7, attention_in_multiplier=1.5,
                      attention_out_multiplier=0.8, ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 0.9],
                      ssm_in_multiplier=1.2, ssm_out_multiplier=0.6)

FAMILY = register(Family(model_type=MODEL_TYPE, hf_class="FalconH1ForCausalLM", config_class="FalconH1Config",
                         schema=SCHEMA, config_from_hf=config_from_hf, build=build, scan=SSD, tiny=TINY_FALCON_H1,
                         renames=RENAMES, bench_configs={"tiny": TINY_FALCON_H1}))
