"""The stack every hybrid family shares: embeddings, a list of layers that are each a Mamba-2 mixer
or an attention block, a final norm, the lm_head. Families (bamba.py, granitemoehybrid.py) supply
the layer class and the names their checkpoints use.

forward(input_ids: (b, l), attention_mask: (b, T), *cache) -> (logits: (b, l, V), *present)
cache, per layer in order (config.HybridConfig.cache_layout): Mamba-2 layers conv_state (b, K−1,
conv_dim), ssm_state (b, heads, head_dim, n) float32; attention layers key, value (b, kv_heads, p,
head_dim) (attention.py); parallel layers all four; FFN layers none; Mamba-1 layers (jamba)
conv_state (b, K−1, d_inner), ssm_state (b, n, d_inner) float32, as the Mamba-1 exports.
present: the same tensors after this call; key/value grown to T = p + l along axis 2.
A layer is called as layer(x, cache: its tensors, allowed, rope) -> (x, [its new tensors]).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ScanExportError
from .attention import RotaryEmbedding, allowed_keys, positions_from_mask
from .config import ATTENTION, PARALLEL, HybridConfig
from .norms import RMSNorm


class HybridLM(nn.Module):
    final_norm_name = "norm"  # model.{final_norm_name}.weight in the checkpoint

    def __init__(self, cfg: HybridConfig, layer_cls):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(layer_cls(cfg, kind) for kind in cfg.layer_types)
        setattr(self.model, self.final_norm_name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        rope = cfg.attention.rope
        self.has_attention = any(k in (ATTENTION, PARALLEL) for k in cfg.layer_types)
        self.rotary = RotaryEmbedding(rope) if rope is not None and self.has_attention else None

    def forward(self, input_ids, attention_mask, *cache):
        cfg = self.cfg
        counts = [len(tensors) for _, _, tensors in cfg.cache_layout()]
        if len(cache) != sum(counts):
            raise ScanExportError(f"expected {sum(counts)} cache tensors (cache_layout), got {len(cache)}")
        l = input_ids.shape[1]
        embeddings = x = self.model.embed_tokens(input_ids)
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        allowed = rope = None
        if self.has_attention:
            allowed = allowed_keys(attention_mask, l)
            if self.rotary is not None:
                rope = self.rotary(positions_from_mask(attention_mask, l), x.dtype)
        present, at = [], 0
        for layer, n in zip(self.model.layers, counts):
            x, new = self.run_layer(layer, x, embeddings, cache[at:at + n], allowed, rope)
            present += new
            at += n
        logits = self.lm_head(getattr(self.model, self.final_norm_name)(x))
        if cfg.logits_scaling != 1.0:
            logits = logits / cfg.logits_scaling
        return (logits, *present)

    def run_layer(self, layer, x, embeddings, cache, allowed, rope):
        """One layer: (x, its new cache tensors). embeddings (b, l, hidden) is the embedding output,
        for a family whose layers also read it (Zamba2's hybrid layers); the rest ignore it."""
        return layer(x, cache, allowed, rope)

    def zero_state(self, batch: int, dtype=None, past_seqlen: int = 0) -> list[torch.Tensor]:
        """The cache a new sequence starts from: zero Mamba states, KV caches of past_seqlen zeros
        (0 for a real start; the export's example uses a few, so that the dim stays dynamic)."""
        dtype = dtype or self.lm_head.weight.dtype
        out = []
        for _, _, tensors in self.cfg.cache_layout():
            for _, shape, kind in tensors:
                shape = [past_seqlen if d == "past_seqlen" else d for d in shape]
                out.append(torch.zeros(batch, *shape, dtype=torch.float32 if kind == "state" else dtype))
        return out
