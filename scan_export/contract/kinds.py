"""Layer kinds, one vocabulary: the names scan_export.json's `state[].kind` and `layer_kinds` have
always used, taken by the reference models too, and the cache tensors each kind carries.

A layer config's parts declare their own cache (as mamba_ssm's modules own
allocate_inference_cache): a Mamba mixer's dims give conv_state and ssm_state (mamba_cache), an
attention block's give key and value (attention_cache). A kind only says which parts it has, so
a new kind is one KIND_PARTS row, and the cache layout, scan_export.json, the hosts and genai's
config follow from it.
"""

from __future__ import annotations

from typing import NamedTuple

MAMBA1 = "mamba"  # a Mamba-1 mixer: Mamba / FalconMamba layers, Jamba's Mamba layers
MAMBA2 = "mamba2"  # a Mamba-2 mixer: Mamba-2 layers, the Mamba layers of the Mamba-2 hybrids
ATTENTION = "attention"  # attention with a KV cache
PARALLEL = "mamba2+attention"  # Falcon-H1, Zamba2's hybrid layers: a Mamba-2 mixer and attention side by side
FFN = "ffn"  # Nemotron-H's MLP / MoE layers: no cache
SHORTCONV = "shortconv"  # LFM2's gated short convolution: a depthwise causal conv's state, no scan
GATED_DELTANET = "gated_deltanet"  # Qwen3.5 / Qwen3-Next linear-attention layers: a short conv and a delta-rule state

# Which parts of a layer config carry the kind's cache, in the graph's order: "mamba" (its Mamba
# mixer dims), "attention" (its attention dims) and "shortconv" (a short convolution's dims);
# each part's cache_tensors() says what.
KIND_PARTS = {MAMBA1: ("mamba",), MAMBA2: ("mamba",), ATTENTION: ("attention",), PARALLEL: ("mamba", "attention"),
              FFN: (), SHORTCONV: ("shortconv",),
              GATED_DELTANET: ("gated_deltanet",)}
LAYER_KINDS = tuple(KIND_PARTS)

KV_MEANING = ("keys (after RoPE) / values of every cached position, oldest first; a new sequence starts "
              "with past_seqlen 0; present = past followed by this call's seqlen positions (axis 2)")


class CacheTensor(NamedTuple):
    """One cache tensor of a layer; unpacks as (name, shape, dtype)."""

    name: str  # conv_state, ssm_state, key, value
    shape: tuple  # without batch; the string "past_seqlen" marks the axis that grows
    dtype: str  # "model": the export's dtype; "state": float32 whatever the model's (the scan state)


# Per tensor: the graph's input-name prefix, how a new sequence starts, and what it holds.
_ROLES = {
    "conv_state": ("past", "zeros", "the last K-1 inputs of the depthwise conv, oldest first, channels last"),
    "ssm_state": ("past", "zeros", "the scan state h: (d_state, d_inner) for Mamba-1 (channels last), "
                                   "(heads, head_dim, d_state) for Mamba-2"),
    "key": ("past_key_values", "empty", KV_MEANING),
    "value": ("past_key_values", "empty", KV_MEANING),
}


def mamba_cache(conv_shape: tuple, ssm_shape: tuple) -> list[CacheTensor]:
    """A Mamba mixer's cache: conv_state (K−1, conv_dim) in the model dtype, ssm_state float32."""
    return [CacheTensor("conv_state", tuple(conv_shape), "model"), CacheTensor("ssm_state", tuple(ssm_shape), "state")]


def shortconv_cache(conv_shape: tuple) -> list[CacheTensor]:
    """A short convolution's cache: conv_state (K−1, channels) alone, in the model dtype. The name is
    the Mamba mixers' (the same tensor: the conv's last K−1 inputs, channels last), so that genai's
    config (conv_state → past_conv_names) and the hosts bind it as they bind those."""
    return [CacheTensor("conv_state", tuple(conv_shape), "model")]


def attention_cache(num_kv_heads: int, head_dim: int) -> list[CacheTensor]:
    """An attention block's KV cache: (kv_heads, past_seqlen, head_dim) each, in the model dtype."""
    shape = (num_kv_heads, "past_seqlen", head_dim)
    return [CacheTensor("key", shape, "model"), CacheTensor("value", shape, "model")]


def io_names(layer: int, tensor: str) -> tuple[str, str]:
    """(graph input, graph output) of a layer's cache tensor."""
    return f"{_ROLES[tensor][0]}.{layer}.{tensor}", f"present.{layer}.{tensor}"


# A tensor name a kind reuses with another content: its meaning for that kind. The names stay
# conv_state / ssm_state so that genai's config and the hosts map them with no new code.
_KIND_MEANINGS = {
    (GATED_DELTANET, "ssm_state"): "the delta-rule state S: (heads, d_k, d_v), transformers' layout; "
                                   "o = qᵀS, S' = α·S + k ⊗ (βv − αβ·kᵀS)",
}


def tensor_entry(layer: int, t: CacheTensor, dtype: str, kind: str | None = None) -> dict:
    """scan_export.json's description of one cache tensor (dtype: the export's; kind: the layer's,
    for the names a kind gives another meaning)."""
    prefix, init, meaning = _ROLES[t.name]
    meaning = _KIND_MEANINGS.get((kind, t.name), meaning)
    inp, out = io_names(layer, t.name)
    entry = {"input": inp, "output": out, "shape": ["batch", *t.shape]}
    if "past_seqlen" in t.shape:
        entry["output_shape"] = ["batch", *("total_seqlen" if d == "past_seqlen" else d for d in t.shape)]
    entry.update(dtype=dtype if t.dtype == "model" else "float32", init=init)
    if "past_seqlen" in t.shape:
        entry["seq_axis"] = 1 + t.shape.index("past_seqlen")
    entry["meaning"] = meaning
    return entry


def state_entry(layer: int, kind: str, tensors: list[CacheTensor], dtype: str) -> dict:
    """scan_export.json's `state` entry of one layer: {"layer", "kind", tensor name: tensor_entry}."""
    return {"layer": layer, "kind": kind, **{t.name: tensor_entry(layer, t, dtype, kind) for t in tensors}}
