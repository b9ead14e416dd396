"""Quality of an export measured on text: held-out bits per byte, and greedy agreement between two
exports. numpy + onnxruntime only (never torch), so a quantized or fp16 export is judged by the
runtime that will serve it.

    from scan_export.runtime import ExportedModel
    from scan_export.runtime.quality import bits_per_byte, greedy_agreement
    bits_per_byte(ExportedModel("out-fp32"), open("heldout.txt", "rb").read())    # -> 2.31
    greedy_agreement(ExportedModel("out-fp32"), ExportedModel("out-int4"), [b"The ", b"def "], 256)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ScanExportError, describe_value
from .generate import ExportedModel, generate

# A byte-level export maps this text to its bytes exactly (token id = byte value).
BYTE_PROBE = "bits per byte\n"


def require_byte_vocabulary(model: ExportedModel, needed_by: str) -> None:
    """ScanExportError unless token id = byte value: vocab_size >= 256 and, when the export has a
    tokenizer, it encodes an ASCII probe to the probe's bytes."""
    if model.vocab_size < 256:
        raise ScanExportError(f"{needed_by} needs a byte-level export (token id = byte value, vocab_size >= 256); "
                              f"{model.export_dir} has vocab_size {model.vocab_size}")
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.encode(BYTE_PROBE).ids != list(BYTE_PROBE.encode()):
        raise ScanExportError(f"{needed_by} needs a byte-level export (token id = byte value); the tokenizer of "
                              f"{model.export_dir} encodes {BYTE_PROBE!r} to {tokenizer.encode(BYTE_PROBE).ids[:8]}")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits: (l, V) -> log p: (l, V) float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_bits(model: ExportedModel, ids, chunk: int = 1024) -> np.ndarray:
    """-log2 p(ids[t] | ids[:t]) for t = 1 .. n-1: (n-1,) float64 (the first token has no prediction).

    The sequence goes through the graph `chunk` tokens at a time with the state carried between
    calls, as a long prefill would; the logits of a chunk's last position predict the next chunk's
    first token."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] < 2:
        raise ScanExportError(f"ids: expected a 1-D sequence of at least 2 token ids, got shape {ids.shape}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ScanExportError(f"chunk: expected an int >= 1, got {describe_value(chunk)}")
    ids = model.check_ids(ids[None])[0]
    state = model.zero_state(1)
    bits, carried = [], None  # carried: (V,) log p of the token after the previous chunk
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        logits, state = model.forward(piece[None], state, logits_to_keep=0)
        logp = _log_softmax(logits[0])  # (l, V): row t predicts piece[t + 1]
        if carried is not None:
            bits.append(-carried[piece[0]][None])
        bits.append(-logp[np.arange(len(piece) - 1), piece[1:]])
        carried = logp[-1]
    return np.concatenate(bits) / math.log(2)


def bits_per_byte(model: ExportedModel, data: bytes, chunk: int = 1024) -> float:
    """Mean -log2 p(next byte) over data[1:] for a byte-level export (token id = byte value)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 2:
        raise ScanExportError(f"data: expected bytes of length >= 2, got {describe_value(data)}")
    require_byte_vocabulary(model, "bits_per_byte")
    return float(token_bits(model, np.frombuffer(bytes(data), np.uint8), chunk).mean())


@dataclass(frozen=True)
class Agreement:
    """Greedy continuations of the same prompts by two exports, compared position by position.

    fraction: identical tokens / all generated tokens (over every prompt); first_divergence: per
    prompt, the index of the first differing token (n_tokens when none differs)."""

    fraction: float
    first_divergence: list[int]
    n_tokens: int


def greedy_agreement(a: ExportedModel, b: ExportedModel, prompts, n_tokens: int = 256) -> Agreement:
    """Greedy-decode n_tokens from each prompt with both exports (same prompts as generate() takes;
    bytes are taken as byte-level token ids) and compare the continuations position by position."""
    if isinstance(prompts, (bytes, bytearray)):
        prompts = [prompts]
    rows = [list(p) if isinstance(p, (bytes, bytearray)) else p for p in prompts] if isinstance(prompts, list) else prompts
    if isinstance(prompts, list) and any(isinstance(p, (bytes, bytearray)) for p in prompts):
        for m in (a, b):
            require_byte_vocabulary(m, "greedy_agreement with bytes prompts")
    ta = generate(a, rows, n_tokens)
    tb = generate(b, rows, n_tokens)
    same = [np.asarray(x) == np.asarray(y) for x, y in zip(ta, tb)]
    first = [int(np.argmin(s)) if not s.all() else len(s) for s in same]
    total = sum(len(s) for s in same)
    return Agreement(fraction=float(sum(s.sum() for s in same)) / total if total else 1.0,
                     first_divergence=first, n_tokens=n_tokens)
