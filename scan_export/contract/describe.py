"""scan_export.json for an export, and the graph's cache I/O names, from a model config's cache layout.

cfg is duck-typed: cache_layout() -> [(layer, kind, [CacheTensor])] (reference/models/config.py
gives it for MambaLMConfig and HybridConfig), plus the sizes written at the top level.

  inputs   input_ids: (batch, seqlen) int64
           attention_mask (hybrids): (batch, total_seqlen) int64, total_seqlen = past_seqlen + seqlen
           per layer i, in layer order, its kind's cache tensors (kinds.KIND_PARTS):
             Mamba-2:   past.{i}.conv_state (batch, K−1, conv_dim), past.{i}.ssm_state (batch, heads, head_dim, n) f32
             Mamba-1:   past.{i}.conv_state (batch, K−1, d_inner), past.{i}.ssm_state (batch, n, d_inner) f32
             attention: past_key_values.{i}.key, past_key_values.{i}.value (batch, kv_heads, past_seqlen, head_dim)
           logits_to_keep: () int64
  outputs  logits, then present.{i}.* in the same order; present keys/values are (batch, kv_heads, total_seqlen, head_dim)
"""

from __future__ import annotations

from .kinds import io_names, state_entry
from .names import ATTENTION_MASK, FORMAT, FORMAT_VERSION, LOGITS_TO_KEEP, MODEL_FILE

LOGITS_TO_KEEP_MEANING = "0: logits for every position; k > 0: for the last k positions only (generation needs 1)"
LOGITS_MEANING = "logits_len = seqlen, or min(logits_to_keep, seqlen) when logits_to_keep > 0"


def cache_names(cfg) -> list[tuple[str, str]]:
    """[(input, output)] of every cache tensor in the graph's order."""
    return [io_names(i, t.name) for i, _, tensors in cfg.cache_layout() for t in tensors]


def _state(cfg, dtype: str) -> tuple[list, list, list]:
    """(state entries, their graph inputs, their graph outputs); layers without a cache get no entry."""
    state, ins, outs = [], [], []
    for i, kind, tensors in cfg.cache_layout():
        if not tensors:
            continue
        entry = state_entry(i, kind, tensors, dtype)
        state.append(entry)
        for t in tensors:
            e = entry[t.name]
            ins.append({"name": e["input"], "shape": e["shape"], "dtype": e["dtype"]})
            outs.append({"name": e["output"], "shape": e.get("output_shape", e["shape"]), "dtype": e["dtype"]})
    return state, ins, outs


def describe(cfg, dtype: str, target, node_count: int, logits_to_keep_default: int | None = None) -> dict:
    """scan_export.json's body for a Mamba / FalconMamba / Mamba-2 export (describe_hybrid: the rest).
    logits_to_keep_default: the value a host that never feeds logits_to_keep gets (genai target)."""
    state, ins, outs = _state(cfg, dtype)
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "model_file": MODEL_FILE, "model_type": cfg.model_type,
        "dtype": dtype, "ir_version": target.ir_version, "opset": target.opset, "target": target.name,
        "vocab_size": cfg.vocab_size, "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "state_size": cfg.state_size, "conv_kernel": cfg.conv_kernel,
        "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id, "node_count": node_count,
        "inputs": [{"name": "input_ids", "shape": ["batch", "seqlen"], "dtype": "int64"}, *ins,
                   {"name": LOGITS_TO_KEEP, "shape": [], "dtype": "int64", "meaning": LOGITS_TO_KEEP_MEANING,
                    # genai target: a host may leave it unfed (onnxruntime-genai does; the web host must).
                    **({"default": logits_to_keep_default} if logits_to_keep_default is not None else {})}],
        "outputs": [{"name": "logits", "shape": ["batch", "logits_len", cfg.vocab_size], "dtype": dtype,
                     "meaning": LOGITS_MEANING}, *outs],
        "state": state,
        "state_init": "zeros: a new sequence starts from all-zero conv and ssm states",
    }


def describe_hybrid(cfg, dtype: str, target, node_count: int) -> dict:
    """scan_export.json's body for a hybrid export: KV caches next to the Mamba states, attention_mask."""
    state, ins, outs = _state(cfg, dtype)
    a = cfg.attention
    mask = {"name": ATTENTION_MASK, "shape": ["batch", "total_seqlen"], "dtype": "int64",
            "meaning": "1 for every real token of the cache and every new token, 0 for padding in the KV cache "
                       "(shorter sequences left-padded when stacked); total_seqlen = past_seqlen + seqlen; "
                       "positions are cumsum(mask) - 1"}
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "model_file": MODEL_FILE, "model_type": cfg.model_type,
        "dtype": dtype, "ir_version": target.ir_version, "opset": target.opset, "target": target.name,
        "vocab_size": cfg.vocab_size, "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mamba.intermediate_size, "state_size": cfg.mamba.state_size,
        "conv_kernel": cfg.mamba.conv_kernel, "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
        "node_count": node_count,
        "layer_kinds": list(cfg.layer_types),
        "attention": {"num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
                      "rope": None if a.rope is None else {"theta": a.rope.theta, "rotary_dim": a.rope.rotary_dim,
                                                          "factor": a.rope.factor}},
        "experts": {"num_experts": cfg.num_experts, "experts_per_token": cfg.experts_per_token} if cfg.num_experts else None,
        "inputs": [{"name": "input_ids", "shape": ["batch", "seqlen"], "dtype": "int64"}, mask, *ins,
                   {"name": LOGITS_TO_KEEP, "shape": [], "dtype": "int64", "meaning": LOGITS_TO_KEEP_MEANING}],
        "outputs": [{"name": "logits", "shape": ["batch", "logits_len", cfg.vocab_size], "dtype": dtype,
                     "meaning": LOGITS_MEANING}, *outs],
        "state": state,
        "attention_mask": {"input": ATTENTION_MASK, "shape": ["batch", "total_seqlen"], "dtype": "int64"},
        "state_init": "each state tensor's init: 'zeros' (Mamba conv and ssm states) or 'empty' (KV caches: "
                      "past_seqlen 0); attention_mask then covers only the new tokens",
    }
