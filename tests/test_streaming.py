"""Streamed text is the real text: incremental detokenization (runtime.streaming) and `generate`'s stream.

Two tokenizers are trained here on a corpus of accents, CJK and emoji: a byte-level BPE (a character
can split over tokens, each half decodes to "\ufffd") and a SentencePiece-style BPE with the Metaspace
pre-tokenizer and decoder (a token decoded alone loses its leading space). Decoding token by
token is wrong for both; every test checks that it would have been, so none passes vacuously.
Exact string equality throughout: text has no tolerance.
"""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

pytest.importorskip("transformers", reason="the tiny checkpoint is made with transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.runtime.streaming import TextStream, TextStreams  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

CORPUS = ["Café crème brûlée à la française, naïve façade.", "東京の天気は晴れです。日本語の文章を書きます。",
          "I love 🐍 and 🚀 rockets 🎉 at the fête!", "Ελληνικά γράμματα και ñandú, über Straße.",
          "Ça va? Très bien, merci. 北京欢迎你 😀"] * 4
# Greedy generation from these (seeded tiny model, measured): with the byte-level BPE the new tokens
# split multi-byte characters that the whole decode joins; with Metaspace they start new words.
PROMPTS = ["Café crème 東京", "🐍 über"]


def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def metaspace_bpe() -> Tokenizer:
    """SentencePiece-style: spaces become "▁" glued to the next word. BPE rather than Unigram because
    tokenizers' UnigramTrainer orders tied pieces differently from run to run (measured: 20 runs, 20
    vocabularies), which would change the ids and so the generated text; BpeTrainer is repeatable."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    return tok


TOKENIZERS = {"byte_level_bpe": byte_level_bpe, "metaspace_bpe": metaspace_bpe}


def naive(tok: Tokenizer, ids: list[int]) -> str:
    """What the CLI used to stream: each token decoded alone."""
    return "".join(tok.decode([t]) for t in ids)


def streamed(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """(the piece put() returned for each token, what end() flushed)."""
    s = TextStream(tok)
    return [s.put(t) for t in ids], s.end()


def byte_tokens(tok: Tokenizer, text: str) -> list[int]:
    """text as one token per UTF-8 byte (the byte-level alphabet), splitting every multi-byte char."""
    (mapped, _), = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    ids = [tok.token_to_id(c) for c in mapped]
    assert None not in ids and len(ids) == len(text.encode())
    return ids


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


def test_a_split_character_is_held_back_then_printed_whole(bpe):
    ids = byte_tokens(bpe, "aé🐍b")  # 1 + 2 + 4 + 1 bytes
    assert bpe.decode(ids) == "aé🐍b"
    assert naive(bpe, ids) == "a" + "\ufffd" * 6 + "b"  # what per-token decoding printed
    pieces, rest = streamed(bpe, ids)
    assert pieces == ["a", "", "é", "", "", "", "🐍", "b"] and rest == ""


def test_an_incomplete_tail_is_flushed_as_decode_shows_it(bpe):
    ids = byte_tokens(bpe, "é")[:1] + byte_tokens(bpe, "🐍")[:2]  # a lead byte, then half an emoji
    pieces, rest = streamed(bpe, ids)
    assert pieces == ["", "", ""] and "".join(pieces) + rest == bpe.decode(ids) and "\ufffd" in rest


def test_an_invalid_byte_mid_text_streams_as_decode_shows_it(bpe):
    ids = byte_tokens(bpe, "é")[1:] + byte_tokens(bpe, "xé")  # a lone continuation byte, then text
    pieces, rest = streamed(bpe, ids)
    assert "".join(pieces) + rest == bpe.decode(ids) == "\ufffdxé"


def test_metaspace_keeps_the_spaces_a_lone_token_loses():
    tok = metaspace_bpe()
    ids = tok.encode("Café crème über 東京 🐍").ids
    want = tok.decode(ids)
    assert naive(tok, ids).count(" ") < want.count(" ")  # per-token decoding ran the words together
    pieces, rest = streamed(tok, ids)
    assert "".join(pieces) + rest == want and rest == ""


def test_batch_rows_stream_independently(bpe):
    a, b = byte_tokens(bpe, "né🐍"), byte_tokens(bpe, "東京x")
    streams, out = TextStreams(bpe, 2), ["", ""]
    for i in range(max(len(a), len(b))):  # interleaved as generate() calls on_token, row by row
        for row, ids in enumerate((a, b)):
            if i < len(ids):
                out[row] += streams.put(row, ids[i])
    out = [o + r for o, r in zip(out, streams.end())]
    assert out == ["né🐍", "東京x"]


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def export_with_tokenizer(request, tmp_path_factory):
    tok = TOKENIZERS[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / "ckpt", "mamba", vocab_size=tok.get_vocab_size())  # every id decodes
    out = export_model(ckpt, root / "export")
    tok.save(str(out / "tokenizer.json"))
    return request.param, tok, out


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_cli_stream_equals_json_text(export_with_tokenizer, prompt, sample, capsys):
    kind, tok, out = export_with_tokenizer
    args = ["generate", str(out), "--prompt", prompt, "--max-new-tokens", "40"]
    args += ["--do-sample", "--seed", "0"] if sample else []
    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed == got["text"] + "\n"
    tokens, text = got["tokens"], got["text"]
    assert text == tok.decode(tokens) and len(tokens) == 40
    # The run must be one that per-token decoding got wrong, or this test shows nothing.
    if kind == "byte_level_bpe":
        assert naive(tok, tokens).count("\ufffd") > text.count("\ufffd"), "no character split over tokens"
    else:
        assert naive(tok, tokens).count(" ") < text.count(" "), "no token began a new word"
