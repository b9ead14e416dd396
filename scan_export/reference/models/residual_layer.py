"""The pre-norm hybrid layer Bamba and Jamba share: r + mixer(input_layernorm(r)), then
+ feed_forward(pre_ff_layernorm(·)). Written once so that the two families' layers cannot drift
apart; each family's subclass builds the modules (its mixer kinds, its feed-forward)."""

from __future__ import annotations

from torch import nn


class MixerThenFeedForward(nn.Module):
    """The mixer is `mamba` (a Mamba mixer: h, *state) or `self_attn` (attention: h, key, value)."""

    def forward(self, x, cache, allowed, rope):
        h = self.input_layernorm(x)
        if hasattr(self, "mamba"):
            h, *cache = self.mamba(h, *cache)
        else:
            h, *cache = self.self_attn(h, *cache, allowed, rope)
        x = x + h
        return x + self.feed_forward(self.pre_ff_layernorm(x)), cache
