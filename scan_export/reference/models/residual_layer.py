"""The pre-norm hybrid layer most families share: r + mixer(norm(r)), then + feed_forward(norm(·)).
Written once so that the families' layers cannot drift apart; each family's subclass builds the
modules under its checkpoint's names (its mixer kinds, its feed-forward) and says which names those
are (Bamba and Jamba keep the defaults; LFM2 and Qwen3.5 name theirs)."""

from __future__ import annotations

from torch import nn


class MixerThenFeedForward(nn.Module):
    """The mixer is the recurrent one (MIXER: h, *state -> h, *state) when the layer has it, else
    `self_attn` (attention: h, key, value, allowed, rope -> h, key, value)."""

    MIXER_NORM, MIXER, FFN_NORM, FFN = "input_layernorm", "mamba", "pre_ff_layernorm", "feed_forward"

    def forward(self, x, cache, allowed, rope):
        h = getattr(self, self.MIXER_NORM)(x)
        if hasattr(self, self.MIXER):
            h, *cache = getattr(self, self.MIXER)(h, *cache)
        else:
            h, *cache = self.self_attn(h, *cache, allowed, rope)
        x = x + h
        return x + getattr(self, self.FFN)(getattr(self, self.FFN_NORM)(x)), cache
