"""The Python API a user reaches for: `from scan_export.runtime import ExportedModel, generate, Sampling`.

Every prompt form generate() takes gives the tokens its list-of-lists form gives; bad inputs are a
one-line ScanExportError naming `prompts`; the tokenizer is read lazily, so a corrupt tokenizer.json
only matters to text; one model shared by 4 threads gives the tokens it gives sequentially. Token ids
are compared exactly: the same graph on the same inputs in the same process is deterministic.
"""

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the tiny checkpoint is made with transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.runtime import ExportedModel, Sampling, generate, generate_text  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

from .test_streaming import byte_level_bpe  # noqa: E402

N = 12  # new tokens per prompt: enough to leave the prompt behind, cheap on 2 cores
IDS = [[5, 6, 7], [9, 10, 11, 12, 13], [42]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One export three ways: without a tokenizer, with a byte-level BPE, with a corrupt tokenizer.json."""
    tok = byte_level_bpe()
    root = tmp_path_factory.mktemp("api")
    plain = export_model(make_tiny_checkpoint(root / "ckpt", "mamba", vocab_size=tok.get_vocab_size()), root / "plain")
    with_tok, corrupt = shutil.copytree(plain, root / "with_tok"), shutil.copytree(plain, root / "corrupt")
    tok.save(str(with_tok / "tokenizer.json"))
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut off mid-write
    return {"plain": plain, "with_tok": with_tok, "corrupt": corrupt, "tok": tok}


@pytest.fixture(scope="module")
def model(dirs):
    return ExportedModel(dirs["with_tok"])


def test_import_is_torch_free():
    code = ("import sys; from scan_export.runtime import ExportedModel, Sampling, generate, generate_text; "
            "assert 'torch' not in sys.modules and 'tokenizers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_prompt_form_gives_the_rows_of_the_list_form(model, dirs):
    want = generate(model, IDS, N)
    assert all(type(t) is int for row in want for t in row) and [len(r) for r in want] == [N] * 3
    for one, row in zip(IDS, want):
        assert generate(model, one, N) == [row]  # flat list: one prompt, still one row back
        assert generate(model, tuple(one), N) == [row]
        assert generate(model, np.array(one, np.int32), N) == [row]
        assert generate(model, np.array([one]), N) == [row]
    assert generate(model, [np.array(p) for p in IDS], N) == want
    assert generate(model, np.array([IDS[0], IDS[0][::-1]], np.int64), N) == generate(model, [IDS[0], IDS[0][::-1]], N)
    assert generate(model, np.zeros((0, 3), np.int64), N) == []


def test_text_prompts_go_through_the_tokenizer(model, dirs):
    tok, texts = dirs["tok"], ["Café crème 東京", "🐍 über", "x"]
    ids = [tok.encode(t).ids for t in texts]
    assert generate(model, texts[0], N) == generate(model, [ids[0]], N)
    assert generate(model, texts, N) == generate(model, ids, N)
    s = Sampling(do_sample=True, temperature=0.9, top_k=50, seed=4)
    assert generate(model, texts, N, sampling=s) == generate(model, ids, N, sampling=s)


def test_generate_text_decodes_and_streams(model, dirs):
    tok, texts = dirs["tok"], ["Café crème 東京", "🐍 über"]
    pieces = [[], []]
    got = generate_text(model, texts, N, on_text=lambda row, piece: pieces[row].append(piece))
    assert got == [tok.decode(t) for t in generate(model, texts, N)]
    assert ["".join(p) for p in pieces] == got
    with pytest.raises(ScanExportError, match=r"generate_text needs .*tokenizer\.json"):
        generate_text(ExportedModel(dirs["plain"]), IDS, N)


# (prompts, what the message must say). Each names `prompts`, what was expected and what arrived.
BAD_PROMPTS = [
    ([], r"prompts: expected a str, .* got \[\]"),
    ("", r"prompts: prompt 0 is empty: '' encodes to no tokens"),
    ([[1], []], r"prompts: prompt 1 is empty; .* got \[\]"),
    ([1, 2.5], r"prompts: prompt 0 has 2\.5 at position 1; expected int token ids"),
    ([1.5, 2], r"prompts: expected a str, .* got \[1\.5, 2\]"),
    ([True, False], r"prompts: expected a str, .* got \[True, False\]"),
    (np.array([1.0, 2.0]), r"prompts: expected .* got a numpy array of dtype float64"),
    (np.zeros((1, 2, 3), np.int64), r"prompts: expected .* got a 3-D array of shape \(1, 2, 3\)"),
    ([[[1]]], r"prompts: prompt 0 has \[1\] at position 0; expected int token ids"),
    ([[1], 2], r"prompts: prompt 1 should be a list of token ids .* got 2"),
    (["a", 1], r"prompts: a list of str has item 1 = 1; expected a str"),
    ([[1, 400]], r"prompts: prompt 0: input_ids must lie in \[0, 400\) \(vocab_size\), got token id 400"),
    ([-1], r"prompts: prompt 0: input_ids must lie in \[0, 400\) \(vocab_size\), got token id -1"),
    ({"input_ids": [1]}, r"prompts: expected .* got \{'input_ids': \[1\]\}"),
]


@pytest.mark.parametrize("prompts, message", BAD_PROMPTS, ids=[repr(p)[:30] for p, _ in BAD_PROMPTS])
def test_bad_prompts_name_the_argument(model, prompts, message):
    with pytest.raises(ScanExportError, match=message) as e:
        generate(model, prompts, N)
    assert "\n" not in str(e.value)


def test_other_bad_arguments(model, dirs):
    cases = [
        (lambda: generate(ExportedModel(dirs["plain"]), "hello", N), r"a str in prompts needs .*plain/tokenizer\.json"),
        (lambda: generate(model, IDS, -1), r"max_new_tokens must be an int in \[0, 1000000\], got -1"),
        (lambda: generate(model, IDS, 2.0), r"max_new_tokens must be an int in \[0, 1000000\], got 2\.0"),
        (lambda: generate(model, IDS, 10**20), r"max_new_tokens must be an int in \[0, 1000000\], got 1000000"),
        (lambda: generate(model, IDS, N, stop_token_id="eos"), r"stop_token_id must be an int token id or None"),
        (lambda: generate(model, IDS, N, sampling={"do_sample": True}), r"sampling must be a Sampling\(\.\.\.\)"),
        (lambda: Sampling(do_sample=True, temperature=0), r"temperature must be > 0 when sampling, got 0"),
        (lambda: ExportedModel(dirs["plain"] / "nope"), r"export directory .*nope' does not exist"),
    ]
    for call, message in cases:
        with pytest.raises(ScanExportError, match=message):
            call()


def test_corrupt_tokenizer_only_matters_to_text(dirs, capsys):
    plain, corrupt = ExportedModel(dirs["plain"]), ExportedModel(dirs["corrupt"])  # loading does not read it
    assert generate(corrupt, IDS, N) == generate(plain, IDS, N)
    bad = str(dirs["corrupt"] / "tokenizer.json")
    for use in (lambda: corrupt.tokenizer, lambda: generate(corrupt, "hello", N)):
        with pytest.raises(ScanExportError, match="is not a readable tokenizers file") as e:
            use()
        assert str(e.value).startswith(bad) and "\n" not in str(e.value)
    assert main(["generate", str(dirs["corrupt"]), "--input-ids", "5,6,7", "--max-new-tokens", str(N), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"tokens": generate(plain, IDS[:1], N)[0], "text": None}
    assert err.count("\n") == 1 and "note:" in err and bad in err  # one line saying why there is no text
    assert main(["generate", str(dirs["corrupt"]), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    assert bad in capsys.readouterr().err


def test_a_broken_description_names_its_file(dirs, tmp_path):
    broken = shutil.copytree(dirs["plain"], tmp_path / "broken")
    (broken / "scan_export.json").write_text("{")
    with pytest.raises(ScanExportError, match=r"broken/scan_export\.json: expected JSON, got a parse error"):
        ExportedModel(broken)


def test_one_model_shared_by_four_threads_matches_sequential(dirs):
    """ExportedModel's docstring promises this. Fresh model, so the 4 threads also race to load the
    tokenizer (two of them pass text); a barrier starts them together, and 3 rounds interleave them."""
    model = ExportedModel(dirs["with_tok"])
    jobs = [("Café crème 東京", Sampling()), ([9, 10, 11, 12, 13], Sampling()),
            (["🐍 über", "x"], Sampling(do_sample=True, top_k=40, seed=7)), (np.array([[42], [43]]), Sampling(do_sample=True, seed=8))]
    rounds = 3
    results = [[None] * len(jobs) for _ in range(rounds)]
    errors = []
    barrier = threading.Barrier(len(jobs))

    def work(i):
        try:
            barrier.wait()
            for r in range(rounds):
                results[r][i] = generate(model, jobs[i][0], 2 * N, sampling=jobs[i][1])
        except Exception as e:  # surfaced below: an exception in a thread does not fail the test by itself
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    sequential = [generate(ExportedModel(dirs["with_tok"]), p, 2 * N, sampling=s) for p, s in jobs]
    assert all(results[r] == sequential for r in range(rounds))
    assert len({json.dumps(s) for s in sequential}) == len(jobs)  # the threads really did different work


def test_the_old_name_is_the_same_class():
    """ExportedMamba was the class's name before it ran hybrids; code written against it keeps working."""
    from scan_export.runtime import ExportedMamba, ExportedModel

    assert ExportedMamba is ExportedModel
