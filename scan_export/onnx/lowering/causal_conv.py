"""ONNX lowering of the causal depthwise conv with state (reference/conv.py).

x: (b, l, c) channels-last, conv_state: (b, K−1, c), weight: (c, 1, K), bias: (c,)
  portable: xs = [state, x]; y = bias + Σ_j xs[j : j + l]·w_j; new state = xs[−(K−1):]
  native:   ONNX opset 27 CausalConvWithState on (b, c, l), transposed in and out
"""

from __future__ import annotations

import numpy as np

from .graph_builder import INT64_MAX, GraphBuilder


def emit_causal_conv(gb: GraphBuilder, kernel: int, x, conv_state, weight, bias=None, lowering: str = "portable"):
    """Returns (y: (b, l, c), new_state: (b, K−1, c))."""
    if lowering == "native":
        channels_first = [0, 2, 1]
        y, state = gb.op(
            "CausalConvWithState", gb.op("Transpose", x, perm=channels_first), weight, bias,
            gb.op("Transpose", conv_state, perm=channels_first), n_out=2, activation="none",
        )
        return gb.op("Transpose", y, perm=channels_first), gb.op("Transpose", state, perm=channels_first)
    xs = gb.op("Concat", conv_state, x, axis=1)  # (b, K−1 + l, c)
    w = gb.op("Reshape", weight, gb.ints(0, kernel))  # (c, K)
    axis = gb.ints(1)
    y = bias  # (c,) broadcasts; the first Add below makes it (b, l, c)
    for j in range(kernel):
        # Tap j reads xs[j : j + l]. Its end, counted from the back, is j − (K−1): a constant, so no
        # shape arithmetic is emitted (a decode step pays for every op).
        end = gb.ints(j - (kernel - 1) if j < kernel - 1 else INT64_MAX)
        term = gb.op("Mul", gb.op("Slice", xs, gb.ints(j), end, axis), gb.op("Gather", w, gb.const(j, np.int64), axis=1))
        y = term if y is None else gb.op("Add", y, term)
    return y, gb.op("Slice", xs, gb.ints(-(kernel - 1)), gb.ints(INT64_MAX), axis)
