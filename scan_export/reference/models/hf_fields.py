"""config.json readers several families share: the mamba_* fields of the Mamba-2 hybrids, the
attention heads, and the one activation those mixers take. One place, so that a field read the same
way in two families is read by the same code."""

from __future__ import annotations

from ...errors import ScanExportError
from .config import Mamba2Dims, json_float


def mamba2_dims(raw: dict, eps: float) -> Mamba2Dims:
    """The mamba_* fields bamba and granitemoehybrid share."""
    hidden = raw["hidden_size"]
    heads = raw.get("mamba_n_heads", 128)
    expand = raw.get("mamba_expand", 2)
    d_inner = int(expand * hidden)
    head_dim = raw.get("mamba_d_head", "auto")
    head_dim = d_inner // heads if head_dim == "auto" else head_dim
    if head_dim * heads != d_inner:
        raise ScanExportError(f"fields mamba_d_head * mamba_n_heads: expected mamba_expand * hidden_size = {d_inner}, "
                              f"got {head_dim} * {heads}")
    limit = raw.get("time_step_limit") or (0.0, "inf")
    return Mamba2Dims(hidden_size=hidden, intermediate_size=d_inner, state_size=raw.get("mamba_d_state", 256),
                      conv_kernel=raw.get("mamba_d_conv", 4), num_heads=heads, head_dim=head_dim,
                      n_groups=raw.get("mamba_n_groups", 1), chunk_size=raw.get("mamba_chunk_size", 256),
                      time_step_limit=tuple(json_float(v) for v in limit),
                      use_bias=bool(raw.get("mamba_proj_bias", False)), use_conv_bias=bool(raw.get("mamba_conv_bias", True)),
                      layer_norm_epsilon=eps)


def check_activation(raw: dict) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise ScanExportError(f"field 'hidden_act': expected 'silu', got {raw['hidden_act']!r}")


def attention_heads(raw: dict) -> tuple[int, int, int]:
    heads = raw["num_attention_heads"]
    kv = raw.get("num_key_value_heads") or heads
    if heads % kv:
        raise ScanExportError(f"fields num_attention_heads / num_key_value_heads: expected a multiple, got {heads} / {kv}")
    return heads, kv, raw.get("head_dim") or raw["hidden_size"] // heads
