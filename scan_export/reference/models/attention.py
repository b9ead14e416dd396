"""Grouped-query attention with rotary positions and the KV cache as explicit tensors.

Glossary: b batch, l seqlen (new tokens), p past_seqlen (cached tokens), T = p + l total_seqlen,
h query heads, g kv heads (h = g·r), d head_dim.
Cache: key, value: (b, g, p, d), keys stored after RoPE (as transformers stores them); the layer
returns them grown to (b, g, T, d). attention_mask: (b, T) int64, 1 = a real token, 0 = padding in
the cache (a host left-pads shorter caches when it stacks sequences). Every new token must be 1.
Positions come from the mask: cumsum(mask) − 1, so a left-padded row counts only its real tokens.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch import nn

from .config import AttentionDims, RopeSpec


def positions_from_mask(attention_mask: torch.Tensor, seqlen) -> torch.Tensor:
    """attention_mask: (b, T) -> the new tokens' positions (b, l): cumsum(mask) − 1 over the last l columns."""
    total = attention_mask.shape[1]
    return (attention_mask.cumsum(-1) - 1)[:, total - seqlen:]


def allowed_keys(attention_mask: torch.Tensor, seqlen) -> torch.Tensor:
    """(b, T) mask -> (b, 1, 1, l, T) bool: query i (at cache position p + i) sees key j iff j ≤ p + i
    and key j is a real token. Shaped for scores grouped as (b, g, r, l, T)."""
    total = attention_mask.shape[1]
    j = torch.arange(total, device=attention_mask.device)
    i = torch.arange(seqlen, device=attention_mask.device) + (total - seqlen)
    causal = j[None, :] <= i[:, None]  # (l, T)
    return (causal[None] & (attention_mask[:, None, :] != 0))[:, None, None]


class RotaryEmbedding(nn.Module):
    """transformers' default/linear RoPE: freqs = position · inv_freq in float32, emb = [freqs, freqs]."""

    def __init__(self, spec: RopeSpec):
        super().__init__()
        self.spec = spec
        # transformers' inv_freq, computed here by torch itself on real tensors (even while the
        # memory-lean export builds the model under fake tensors, onnx/fake_params.py), kept as Python
        # floats and put in the graph as a constant. Computing it in forward instead let the
        # exporter's constant folding recompute theta ** x with another pow: 2 ulps off at some
        # frequencies, which moved Falcon-H1's keys by 3.4e-6 relative at position 99 (on AMD EPYC).
        with unset_fake_temporarily():
            dim = spec.rotary_dim
            inv_freq = 1.0 / (spec.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self._inv_freq = tuple((inv_freq / spec.factor).tolist())

    def inv_freq(self) -> torch.Tensor:
        """(rotary_dim / 2,) float32, bit-identical to transformers' buffer."""
        return torch.tensor(self._inv_freq, dtype=torch.float32)

    def forward(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (b, l) -> cos, sin: (b, 1, l, rotary_dim) in dtype."""
        freqs = positions[..., None].float() * self.inv_freq()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x: (b, heads, l, d); rotates the first rotary_dim channels, passes the rest (partial RoPE)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    """q/k/v/o projections named as transformers names them (self_attn.q_proj, ...)."""

    def __init__(self, hidden_size: int, dims: AttentionDims):
        super().__init__()
        h, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.dims = dims
        self.q_proj = nn.Linear(hidden_size, h * d, bias=dims.bias)
        self.k_proj = nn.Linear(hidden_size, g * d, bias=dims.bias)
        self.v_proj = nn.Linear(hidden_size, g * d, bias=dims.bias)
        self.o_proj = nn.Linear(h * d, hidden_size, bias=dims.bias)

    def forward(self, x, past_key, past_value, allowed, rope):
        """x: (b, l, hidden), past_key/value: (b, g, p, d), allowed: (b, 1, 1, l, T) bool,
        rope: (cos, sin) or None -> (y: (b, l, hidden), key, value: (b, g, T, d))"""
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), past_key, past_value, allowed, rope)

    def attend(self, q, k, v, past_key, past_value, allowed, rope):
        """The projections q: (b, l, h·d), k, v: (b, l, g·d) -> (y, key, value) as forward returns them
        (a family that adds to the projections, Zamba2's adapters, calls this directly)."""
        dims = self.dims
        b, l, _ = q.shape
        g, d = dims.num_kv_heads, dims.head_dim
        r = dims.num_heads // g
        q = q.view(b, l, dims.num_heads, d).transpose(1, 2)  # (b, h, l, d)
        k = k.view(b, l, g, d).transpose(1, 2)  # (b, g, l, d)
        v = v.view(b, l, g, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        key = torch.cat([past_key, k], dim=2)  # (b, g, T, d)
        value = torch.cat([past_value, v], dim=2)
        # GQA without repeating the cache: query heads kv·r + i share kv head kv, so (b, h, l, d)
        # groups as (b, g, r·l, d) and multiplies (b, g, d, T) directly.
        scores = torch.matmul(q.reshape(b, g, r * l, d), key.transpose(2, 3)) * dims.scaling  # (b, g, r·l, T)
        scores = scores.view(b, g, r, l, -1)
        # finfo.min rather than −inf (transformers' choice): a row with no visible key stays finite.
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        y = torch.matmul(probs.view(b, g, r * l, -1), value)  # (b, g, r·l, d)
        y = y.view(b, dims.num_heads, l, d).transpose(1, 2).reshape(b, l, dims.num_heads * d)
        return self.o_proj(y), key, value
