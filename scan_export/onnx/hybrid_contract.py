"""scan_export.json for hybrid exports: Mamba-2 state for the Mamba layers, a KV cache for the
attention layers (both for a layer that runs them in parallel, none for a feed-forward-only layer),
and the attention mask (docs/deploy.md has the host's side).

  inputs   input_ids: (batch, seqlen) int64
           attention_mask: (batch, total_seqlen) int64, total_seqlen = past_seqlen + seqlen
           per layer i, in layer order:
             Mamba-2:   past.{i}.conv_state (batch, K−1, conv_dim), past.{i}.ssm_state (batch, heads, head_dim, n) f32
             Mamba-1 (jamba): past.{i}.conv_state (batch, K−1, d_inner), past.{i}.ssm_state (batch, n, d_inner) f32
             attention: past_key_values.{i}.key, past_key_values.{i}.value (batch, kv_heads, past_seqlen, head_dim)
           logits_to_keep: () int64
  outputs  logits, then present.{i}.* in the same order; present keys/values are (batch, kv_heads, total_seqlen, head_dim)
"""

from __future__ import annotations

from ..runtime.contract import ATTENTION_MASK, FORMAT, LOGITS_TO_KEEP, MODEL_FILE

# scan_export.json's version, for every model type (model_export.describe writes the pure-Mamba ones).
# 2: the Mamba-1 ssm_state became channels-last, (batch, n, d_inner), and the input logits_to_keep
# appeared. State inputs are the ones `state` names. 3: `files` lists every file the export wrote
# (a later export into the same directory removes exactly those). 4: hybrid models (bamba,
# granitemoehybrid): KV caches and attention_mask; every state tensor says how it starts ("init")
# and each `state` entry its layer's "kind". Still 4: `sha256` ({file: hash} of every file but
# scan_export.json, output_dir.py) is one more key, which readers of version 4 ignore.
FORMAT_VERSION = 4

KV_MEANING = ("keys (after RoPE) / values of every cached position, oldest first; a new sequence starts "
              "with past_seqlen 0; present = past followed by this call's seqlen positions (axis 2)")


def cache_names(cfg) -> list[tuple[str, str]]:
    """[(input, output)] of every cache tensor in graph order (HybridConfig.cache_layout's order)."""
    names = []
    for i, _, tensors in cfg.cache_layout():
        for tensor, _, _ in tensors:
            if tensor in ("key", "value"):
                names.append((f"past_key_values.{i}.{tensor}", f"present.{i}.{tensor}"))
            else:
                names.append((f"past.{i}.{tensor}", f"present.{i}.{tensor}"))
    return names


# scan_export.json's name for each layer kind (config.py); FFN layers carry no state and get no entry
# ("mamba1", Jamba's Mamba-1 layers, is "mamba" as in the Mamba-1 exports: the same state layout)
ENTRY_KINDS = {"mamba": "mamba2", "attention": "attention", "parallel": "mamba2+attention", "ffn": "ffn",
               "mamba1": "mamba"}


def mamba_state_entry(i: int, conv_shape, ssm_shape, dtype: str) -> dict:
    return {
        "conv_state": {"input": f"past.{i}.conv_state", "output": f"present.{i}.conv_state",
                       "shape": ["batch", *conv_shape], "dtype": dtype, "init": "zeros",
                       "meaning": "the last K-1 inputs of the depthwise conv, oldest first, channels last"},
        "ssm_state": {"input": f"past.{i}.ssm_state", "output": f"present.{i}.ssm_state",
                      "shape": ["batch", *ssm_shape], "dtype": "float32", "init": "zeros",
                      "meaning": "the scan state h: (d_state, d_inner) for Mamba-1 (channels last), "
                                 "(heads, head_dim, d_state) for Mamba-2"},
    }


def describe_hybrid(cfg, dtype: str, target, node_count: int) -> dict:
    conv_shape, ssm_shape = cfg.mamba.state_shapes()
    a = cfg.attention
    state, ins, outs = [], [], []
    for i, kind, tensors in cfg.cache_layout():
        if not tensors:
            continue
        entry = {"layer": i, "kind": ENTRY_KINDS[kind]}
        if kind in ("mamba", "parallel", "mamba1"):
            entry.update(mamba_state_entry(i, conv_shape, ssm_shape, dtype))
        if kind in ("attention", "parallel"):
            for t in ("key", "value"):
                entry[t] = {"input": f"past_key_values.{i}.{t}", "output": f"present.{i}.{t}",
                            "shape": ["batch", a.num_kv_heads, "past_seqlen", a.head_dim],
                            "output_shape": ["batch", a.num_kv_heads, "total_seqlen", a.head_dim],
                            "dtype": dtype, "init": "empty", "seq_axis": 2, "meaning": KV_MEANING}
        tensors = [entry[name] for name, _, _ in tensors]
        state.append(entry)
        ins += [{"name": t["input"], "shape": t["shape"], "dtype": t["dtype"]} for t in tensors]
        outs += [{"name": t["output"], "shape": t.get("output_shape", t["shape"]), "dtype": t["dtype"]} for t in tensors]
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
        "layer_kinds": [ENTRY_KINDS[k] for k in cfg.layer_types],
        "attention": {"num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
                      "rope": None if a.rope is None else {"theta": a.rope.theta, "rotary_dim": a.rope.rotary_dim,
                                                          "factor": a.rope.factor}},
        "experts": {"num_experts": cfg.num_experts, "experts_per_token": cfg.experts_per_token} if cfg.num_experts else None,
        "inputs": [{"name": "input_ids", "shape": ["batch", "seqlen"], "dtype": "int64"}, mask, *ins,
                   {"name": LOGITS_TO_KEEP, "shape": [], "dtype": "int64",
                    "meaning": "0: logits for every position; k > 0: for the last k positions only (generation needs 1)"}],
        "outputs": [{"name": "logits", "shape": ["batch", "logits_len", cfg.vocab_size], "dtype": dtype,
                     "meaning": "logits_len = seqlen, or min(logits_to_keep, seqlen) when logits_to_keep > 0"}, *outs],
        "state": state,
        "attention_mask": {"input": ATTENTION_MASK, "shape": ["batch", "total_seqlen"], "dtype": "int64"},
        "state_init": "each state tensor's init: 'zeros' (Mamba conv and ssm states) or 'empty' (KV caches: "
                      "past_seqlen 0); attention_mask then covers only the new tokens",
    }
