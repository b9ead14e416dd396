"""Incremental detokenization: stream the text of generated tokens as they arrive.

Decoding each token alone is wrong for the tokenizers Mamba checkpoints ship: a byte-level BPE
splits a multi-byte character over tokens (each half decodes to "\ufffd"), and a SentencePiece-style
(Metaspace) decoder drops the leading space of whatever it decodes first, so every word runs into
the last. Instead each row decodes its whole growing sequence and emits only what is new, holding
back a trailing "\ufffd" (an incomplete character the next token may complete), as transformers'
TextStreamer does; `end()` flushes the rest. The pieces of a row joined are exactly
`tokenizer.decode(tokens)` for the decoders whose text for a prefix is a prefix of the text for the
whole once a trailing "\ufffd" is set aside, as ByteLevel's and Metaspace's are (tests/test_streaming.py).
(A decoder that rewrites text it already shown, such as a clean-up of " n't" into "n't", cannot be
streamed exactly by anyone: the stream then goes on by length, emitting what lies past the length
already emitted, so nothing repeats and nothing stalls.)

Needs only an object with `decode(list[int]) -> str` (a `tokenizers.Tokenizer`); no transformers,
no torch. Each step decodes the whole row, O(tokens so far): measured on this 2-core CPU with the
test tokenizers, 0.03-0.04 ms at 256 tokens, 0.2-0.3 ms at 1024, 0.8-1.2 ms at 4096: small beside a
130m-model decode step (~27 ms), not beside the tiny model's (0.13 ms). A window of recent tokens
(text-generation-inference's offsets) would make it O(1), but exact only for decoders whose text
does not depend on tokens before the window; the full decode is exact by construction.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


class TextStream:
    """One row: put(token_id) -> the newly stable text (may be ""); end() -> what was held back.

    Not thread-safe: one stream per row per generation."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = ""  # everything returned so far, concatenated

    def put(self, token_id: int) -> str:
        self.tokens.append(int(token_id))
        text = self.tokenizer.decode(self.tokens)
        return self._emit(text.rstrip(INCOMPLETE))

    def end(self) -> str:
        """Flush: the rest of the decode, incomplete characters included (they stay "\ufffd")."""
        return self._emit(self.tokenizer.decode(self.tokens))

    def _emit(self, stable: str) -> str:
        # By length, not by prefix: equal for the decoders named in the module docstring, and for
        # one that rewrites shown text it emits only text past what was shown (no repeats).
        new = stable[len(self.emitted):]
        self.emitted += new
        return new


class TextStreams:
    """A batch: one TextStream per row. put(row, token_id) -> new text of that row; end() -> the rest
    of every row, in row order. Fits generate()'s on_token(row, token_id) callback."""

    def __init__(self, tokenizer, rows: int):
        self.rows = [TextStream(tokenizer) for _ in range(rows)]

    def put(self, row: int, token_id: int) -> str:
        return self.rows[row].put(token_id)

    def end(self) -> list[str]:
        return [r.end() for r in self.rows]
