"""transformers' hybrid cache read into our state order and layout: the one reader every family uses
today (verify compares the two). numpy only; the cache object is transformers'."""

from __future__ import annotations

import numpy as np

from ...contract.kinds import ATTENTION, MAMBA1, PARALLEL, SHORTCONV


def cache_states(cache, description: dict) -> list[np.ndarray]:
    """transformers' cache in our state order and layout, float64: per Mamba layer conv, ssm; per
    attention layer key, value (b, kv_heads, T, head_dim), the same layout as ours; a layer running
    both ("mamba2+attention": Falcon-H1, Zamba2's hybrid layers) holds all four under one index, in that order."""
    out = []
    for entry in description["state"]:
        layer, kind = entry["layer"], entry["kind"]
        if kind == SHORTCONV:
            # LFM2's short conv: HF keeps (b, hidden, L_cache), we keep the last K−1 columns channels-last.
            out.append(cache.get_conv_state(layer).double().numpy()[..., 1:].transpose(0, 2, 1))
            continue
        if kind != ATTENTION:
            # HF keeps (b, d, K), we keep the last K−1 columns channels-last: (b, K−1, d).
            conv = cache.get_conv_state(layer).double().numpy()[..., 1:].transpose(0, 2, 1)
            ssm = cache.get_recurrent_state(layer).double().numpy()
            if kind == MAMBA1:  # Mamba-1: HF (b, d, n), ours channels-last (b, n, d)
                ssm = ssm.transpose(0, 2, 1)
            out += [conv, ssm]
        if kind in (ATTENTION, PARALLEL):
            out += [cache.layers[layer].keys.double().numpy(), cache.layers[layer].values.double().numpy()]
    return out
