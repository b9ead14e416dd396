"""Careless inputs, as a new user types them: every one ends in exit 2 and one line naming the culprit.

Each row sets up what the user has on disk and the argv they type. The test asserts: exit code 2,
stderr is exactly one line `scan-export: error: ...` that contains the culprit (the flag or the
file), no traceback anywhere, and nothing on disk changed (every pre-existing file byte-identical,
no file added: no staging left behind).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the rows need a tiny checkpoint written by transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.runtime.session import has_cuda_provider  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("careless")
    ckpt = make_tiny_checkpoint(root / "ckpt", "mamba")
    export = export_model(ckpt, root / "export")
    fp16 = export_model(ckpt, root / "export-fp16", dtype="fp16")
    scan = root / "scan.onnx"
    assert main(["scan", "--dim", "16", "--dstate", "4", "--out", str(scan)]) == 0
    return {"ckpt": ckpt, "export": export, "fp16": fp16, "scan": scan}


def _ckpt(tmp, built, name="ckpt"):
    return shutil.copytree(built["ckpt"], tmp / name)


def _export(tmp, built, name="export"):
    return shutil.copytree(built["export"], tmp / name)


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    path.write_text(json.dumps(fn(d)))


def _truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def _drop_field(d, key):
    d.pop(key)
    return d


def _config(t, b, **fields):
    """A copy of the checkpoint whose config.json has these fields set; the export-model argv."""
    _edit_json((c := _ckpt(t, b)) / "config.json", lambda d: {**d, **fields})
    return ["export-model", str(c), "--out", str(t / "o")]


def _transposed(t, b, name="backbone.layers.0.mixer.x_proj.weight"):
    from safetensors.torch import load_file, save_file

    c = _ckpt(t, b)
    d = load_file(str(c / "model.safetensors"))
    d[name] = d[name].T.contiguous()
    save_file(d, str(c / "model.safetensors"), metadata={"format": "pt"})
    return ["export-model", str(c), "--out", str(t / "o")]


def _with_tokenizer(t, b):
    from tokenizers import Tokenizer, models, pre_tokenizers

    e = _export(t, b)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(e / "tokenizer.json"))
    return e


def _swap_model(t, b, source):
    e = _export(t, b)
    shutil.copyfile(source, e / "model.onnx")
    return _gen(e)


def _gen(e, *extra):
    return ["generate", str(e), "--input-ids", "1,2,3", "--max-new-tokens", "2", *extra]


# (row id, setup(tmp, built) -> argv, culprit that the one line must name)
ROWS = [
    # ---- export-model: the checkpoint
    ("export-ckpt-missing", lambda t, b: ["export-model", str(t / "nope"), "--out", str(t / "o")], "nope"),
    ("export-ckpt-is-a-file", lambda t, b: (t / "f.txt").write_text("x") and ["export-model", str(t / "f.txt"), "--out", str(t / "o")], "f.txt"),
    ("export-no-config", lambda t, b: ((c := _ckpt(t, b)) / "config.json").unlink() or ["export-model", str(c), "--out", str(t / "o")], "config.json"),
    ("export-config-not-json", lambda t, b: ((c := _ckpt(t, b)) / "config.json").write_text("{oops") and ["export-model", str(c), "--out", str(t / "o")], "config.json"),
    ("export-config-is-a-list", lambda t, b: ((c := _ckpt(t, b)) / "config.json").write_text("[1, 2]") and ["export-model", str(c), "--out", str(t / "o")], "config.json"),
    ("export-config-no-num-layers", lambda t, b: _edit_json((c := _ckpt(t, b)) / "config.json", lambda d: _drop_field(d, "num_hidden_layers")) or ["export-model", str(c), "--out", str(t / "o")], "num_hidden_layers"),
    ("export-config-unknown-type", lambda t, b: _edit_json((c := _ckpt(t, b)) / "config.json", lambda d: {**d, "model_type": "llama"}) or ["export-model", str(c), "--out", str(t / "o")], "model_type"),
    ("export-config-zero-layers", lambda t, b: _edit_json((c := _ckpt(t, b)) / "config.json", lambda d: {**d, "num_hidden_layers": 0}) or ["export-model", str(c), "--out", str(t / "o")], "num_hidden_layers"),
    ("export-truncated-safetensors", lambda t, b: _truncate((c := _ckpt(t, b)) / "model.safetensors") or ["export-model", str(c), "--out", str(t / "o")], "model.safetensors"),
    ("export-no-weights", lambda t, b: ((c := _ckpt(t, b)) / "model.safetensors").unlink() or ["export-model", str(c), "--out", str(t / "o")], "no weights"),
    ("export-weights-wrong-shape", lambda t, b: _edit_json((c := _ckpt(t, b)) / "config.json", lambda d: {**d, "hidden_size": 32}) or ["export-model", str(c), "--out", str(t / "o")], "shape"),
    # ---- export-model: the output
    ("export-out-nonempty", lambda t, b: (t / "w").mkdir() or (t / "w" / "notes.txt").write_text("mine") and ["export-model", str(_ckpt(t, b)), "--out", str(t / "w")], "/w' is not empty"),
    ("export-out-is-checkpoint", lambda t, b: ["export-model", str(c := _ckpt(t, b)), "--out", str(c)], "checkpoint directory"),
    ("export-out-is-a-file", lambda t, b: (t / "afile.txt").write_text("mine") and ["export-model", str(_ckpt(t, b)), "--out", str(t / "afile.txt")], "afile.txt"),
    ("export-out-empty-string", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", ""], "empty"),
    ("export-out-under-a-file", lambda t, b: (t / "afile.txt").write_text("mine") and ["export-model", str(_ckpt(t, b)), "--out", str(t / "afile.txt" / "x")], "afile.txt"),
    # ---- export-model: flags
    ("export-dtype-bf16", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--dtype", "bf16"], "--dtype"),
    ("export-target-unknown", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--target", "tensorrt"], "--target"),
    ("export-opset-too-low", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--opset", "11"], "opset"),
    ("export-native-on-mamba1", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--lowering", "native", "--target", "ort-1.32"], "lowering"),
    ("export-no-out", lambda t, b: ["export-model", str(_ckpt(t, b))], "--out"),
    ("export-block-size-not-pow2", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int4", "--block-size", "24"], "--block-size"),
    ("export-block-size-below-16", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int8", "--block-size", "8"], "--block-size"),
    ("export-block-size-no-quantize", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--block-size", "32"], "--block-size"),
    ("export-accuracy-level-5", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int4", "--accuracy-level", "5"], "--accuracy-level"),
    ("export-int8-slow-level", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int8", "--accuracy-level", "0"], "--accuracy-level"),
    ("export-int4-fp16", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int4", "--dtype", "fp16"], "--dtype"),
    ("export-int4-ort118", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int4", "--target", "ort-1.18"], "ort-1.18"),
    ("export-quantize-unknown", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int3"], "--quantize"),
    # ---- generate
    ("gen-export-missing", lambda t, b: _gen(t / "nope"), "nope"),
    ("gen-not-an-export", lambda t, b: (t / "d").mkdir() or _gen(t / "d"), "scan_export.json"),
    ("gen-desc-corrupt", lambda t, b: ((e := _export(t, b)) / "scan_export.json").write_text("{") and _gen(e), "scan_export.json"),
    ("gen-desc-is-a-list", lambda t, b: ((e := _export(t, b)) / "scan_export.json").write_text("[]") and _gen(e), "scan_export.json"),
    ("gen-desc-unknown-dtype", lambda t, b: _edit_json((e := _export(t, b)) / "scan_export.json", lambda d: {**d, "dtype": "int3"}) or _gen(e), "dtype"),
    ("gen-desc-unknown-version", lambda t, b: _edit_json((e := _export(t, b)) / "scan_export.json", lambda d: {**d, "version": 99}) or _gen(e), "version"),
    ("gen-model-missing", lambda t, b: ((e := _export(t, b)) / "model.onnx").unlink() or _gen(e), "model.onnx"),
    ("gen-model-empty", lambda t, b: ((e := _export(t, b)) / "model.onnx").write_bytes(b"") or _gen(e), "model.onnx"),
    ("gen-model-truncated", lambda t, b: _truncate((e := _export(t, b)) / "model.onnx", 5000) or _gen(e), "model.onnx"),
    ("gen-ids-not-ints", lambda t, b: ["generate", str(_export(t, b)), "--input-ids", "a,b", "--max-new-tokens", "2"], "--input-ids"),
    ("gen-ids-huge", lambda t, b: ["generate", str(_export(t, b)), "--input-ids", "99999999999999999999", "--max-new-tokens", "2"], "input"),
    ("gen-ids-out-of-vocab", lambda t, b: ["generate", str(_export(t, b)), "--input-ids", "1,300", "--max-new-tokens", "2"], "300"),
    ("gen-ids-empty", lambda t, b: ["generate", str(_export(t, b)), "--input-ids", " , ", "--max-new-tokens", "2"], "input"),
    ("gen-max-new-negative", lambda t, b: ["generate", str(_export(t, b)), "--input-ids", "1", "--max-new-tokens", "-1"], "--max-new-tokens"),
    ("gen-temperature-nan", lambda t, b: _gen(_export(t, b), "--do-sample", "--temperature", "nan"), "--temperature"),
    ("gen-temperature-without-sample", lambda t, b: _gen(_export(t, b), "--temperature", "0.7"), "--temperature"),
    ("gen-top-k-without-sample", lambda t, b: _gen(_export(t, b), "--top-k", "5"), "--top-k"),
    ("gen-seed-without-sample", lambda t, b: _gen(_export(t, b), "--seed", "1"), "--seed"),
    ("gen-top-p-out-of-range", lambda t, b: _gen(_export(t, b), "--do-sample", "--top-p", "1.5"), "--top-p"),
    ("gen-stop-token-out-of-vocab", lambda t, b: _gen(_export(t, b), "--stop-token-id", "999"), "--stop-token-id"),
    ("gen-prompt-no-tokenizer", lambda t, b: ["generate", str(_export(t, b)), "--prompt", "hi", "--max-new-tokens", "2"], "tokenizer.json"),
    ("gen-prompt-corrupt-tokenizer", lambda t, b: ((e := _export(t, b)) / "tokenizer.json").write_text("{") and ["generate", str(e), "--prompt", "hi", "--max-new-tokens", "2"], "tokenizer.json"),
    ("gen-no-ids-nor-prompt", lambda t, b: ["generate", str(_export(t, b)), "--max-new-tokens", "2"], "--prompt"),
    # ---- verify, check, scan, bench, demo, top level
    ("verify-checkpoint-missing", lambda t, b: ["verify", str(_export(t, b)), "--checkpoint", str(t / "nope")], "nope"),
    ("check-missing-file", lambda t, b: ["check", str(t / "nope.onnx")], "nope.onnx"),
    ("check-corrupt-file", lambda t, b: (t / "bad.onnx").write_bytes(b"\x08\x07garbage") and ["check", str(t / "bad.onnx")], "bad.onnx"),
    ("check-not-an-op-model", lambda t, b: ["check", str(_export(t, b) / "model.onnx")], "op model"),
    ("scan-out-is-a-folder", lambda t, b: (t / "d").mkdir() or ["scan", "--out", str(t / "d")], "directory"),
    ("scan-out-foreign-file", lambda t, b: (t / "mine.onnx").write_text("mine") and ["scan", "--out", str(t / "mine.onnx")], "mine.onnx"),
    ("scan-chunk-size-sequential", lambda t, b: ["scan", "--chunk-size", "8", "--out", str(t / "s.onnx")], "--chunk-size"),
    ("scan-chunk-size-zero", lambda t, b: ["scan", "--scan-form", "chunked", "--chunk-size", "0", "--out", str(t / "s.onnx")], "--chunk-size"),
    ("scan-dim-negative", lambda t, b: ["scan", "--dim", "-5", "--out", str(t / "s.onnx")], "--dim"),
    ("scan-dim-not-divisible", lambda t, b: ["scan", "--dim", "10", "--groups", "4", "--out", str(t / "s.onnx")], "groups"),
    ("bench-prefill-zero", lambda t, b: ["bench", "--model", "--prefill-len", "0"], "--prefill-len"),
    ("bench-prefill-without-model", lambda t, b: ["bench", "--prefill-len", "64"], "--prefill-len"),
    ("bench-model-and-ssd", lambda t, b: ["bench", "--model", "--ssd"], "--ssd"),
    ("bench-unknown-config", lambda t, b: ["bench", "--model", "--configs", "7b"], "7b"),
    ("bench-json-foreign-file", lambda t, b: (t / "r.json").write_text("{}") and ["bench", "--json", str(t / "r.json")], "r.json"),
    ("demo-tokens-zero", lambda t, b: ["demo", "--tokens", "0"], "--tokens"),
    ("demo-workdir-foreign", lambda t, b: (t / "wd").mkdir() or (t / "wd" / "thesis.tex").write_text("mine") and ["demo", "--workdir", str(t / "wd")], "--workdir"),
    ("unknown-command", lambda t, b: ["exprot-model"], "exprot-model"),
    ("debug-alone", lambda t, b: ["--debug"], "COMMAND"),
    # ---- issue 21: hostile configs (one schema pass before any work), sizes, flags, swapped files
    ("export-config-hidden-1e9", lambda t, b: _config(t, b, hidden_size=10**9), "hidden_size"),
    ("export-config-eps-a-string", lambda t, b: _config(t, b, layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),
    ("export-config-layers-true", lambda t, b: _config(t, b, num_hidden_layers=True), "num_hidden_layers"),
    ("export-config-layers-1e6", lambda t, b: _config(t, b, num_hidden_layers=10**6), "num_hidden_layers"),
    ("export-config-eos-outside-vocab", lambda t, b: _config(t, b, eos_token_id=999), "eos_token_id"),
    ("export-config-bos-negative", lambda t, b: _config(t, b, bos_token_id=-1), "bos_token_id"),
    ("export-config-use-bias-a-string", lambda t, b: _config(t, b, use_bias="no"), "use_bias"),
    ("export-config-too-big-for-the-disk", lambda t, b: _config(t, b, vocab_size=4_000_000, hidden_size=131072), "would need"),
    ("export-transposed-weight", lambda t, b: _transposed(t, b), "x_proj"),
    ("export-opset-999", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--opset", "999"], "opset"),
    ("export-opset-30", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--opset", "30"], "opset"),
    ("export-block-size-2-40", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int4", "--block-size", str(2**40)], "--block-size"),
    ("export-block-size-above-hidden", lambda t, b: ["export-model", str(_ckpt(t, b)), "--out", str(t / "o"), "--quantize", "int4", "--block-size", "128"], "--block-size"),
    ("export-force-over-users-model", lambda t, b: (t / "w").mkdir() or (t / "w" / "model.onnx").write_text("mine") and ["export-model", str(_ckpt(t, b)), "--out", str(t / "w"), "--force"], "model.onnx"),
    ("gen-prompt-invalid-utf8", lambda t, b: ["generate", str(_with_tokenizer(t, b)), "--prompt", b"\xff\xfehi".decode("utf-8", "surrogateescape"), "--max-new-tokens", "2"], "--prompt"),
    ("gen-max-new-tokens-1e20", lambda t, b: _gen(_export(t, b))[:-2] + ["--max-new-tokens", str(10**20)], "--max-new-tokens"),
    ("gen-model-from-another-export", lambda t, b: _swap_model(t, b, b["fp16"] / "model.onnx"), "model.onnx"),
    ("gen-model-is-a-scan-op-model", lambda t, b: _swap_model(t, b, b["scan"]), "model.onnx"),
    ("gen-desc-vocab-disagrees", lambda t, b: _edit_json((e := _export(t, b)) / "scan_export.json", lambda d: {**d, "vocab_size": 300}) or _gen(e), "vocab_size"),
    ("gen-desc-state-disagrees", lambda t, b: _edit_json((e := _export(t, b)) / "scan_export.json", lambda d: {**d, "state": [{"x": {"input": "past.9.x", "output": "present.9.x"}}]}) or _gen(e), "state"),
    ("gen-desc-shape-disagrees", lambda t, b: _edit_json((e := _export(t, b)) / "scan_export.json", lambda d: {**d, "inputs": [d["inputs"][0], {**d["inputs"][1], "shape": ["batch", 5, 128]}, *d["inputs"][2:]]}) or _gen(e), "shape"),
    ("gen-genai-without-its-config", lambda t, b: _gen(_export(t, b), "--engine", "genai"), "--target genai"),
    ("scan-chunk-size-huge", lambda t, b: ["scan", "--scan-form", "chunked", "--chunk-size", str(10**11), "--out", str(t / "s.onnx")], "--chunk-size"),
    ("bench-json-missing-folder", lambda t, b: ["bench", "--json", str(t / "nope" / "r.json")], "--json"),
    ("verify-tokens-1e11", lambda t, b: ["verify", str(_export(t, b)), "--checkpoint", str(b["ckpt"]), "--tokens", str(10**11)], "--tokens"),
    ("bench-repeats-1e9", lambda t, b: ["bench", "--repeats", str(10**9)], "--repeats"),
    ("bench-configs-empty", lambda t, b: ["bench", "--model", "--configs", ""], "--configs"),
]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_careless_input(row, built, tmp_path, capsys):
    _, setup, culprit = row
    argv = setup(tmp_path, built)
    before = _snapshot(tmp_path)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}\nstdout: {out}\nstderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scan-export: error: "), err
    assert culprit in lines[0], f"the message does not name {culprit!r}: {lines[0]}"
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path) == before, "a careless input changed files on disk"


def test_the_table_is_wide_enough():
    """The issue asks for >= 40 careless inputs, across every subcommand."""
    assert len(ROWS) >= 40
    commands = {r[0].split("-")[0] for r in ROWS}
    assert {"export", "gen", "verify", "check", "scan", "bench", "demo"} <= commands


@pytest.mark.skipif(has_cuda_provider(), reason="this onnxruntime has CUDA; the row is about asking for it without")
def test_cuda_without_cuda_is_one_line(built, capsys):
    assert main(_gen(built["export"], "--provider", "cuda")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDAExecutionProvider" in err[0]


def test_a_full_disk_is_one_line_and_leaves_nothing(built, tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through writing the model (simulated: the disk of this machine is not full)."""
    import errno

    import scan_export.onnx.fake_params as weights

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "model.onnx"))

    monkeypatch.setattr(weights.CheckpointWeights, "finish", full)
    (tmp_path / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path)
    assert main(["export-model", str(built["ckpt"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert _snapshot(tmp_path) == before


def test_an_unwritable_out_is_one_line(built, tmp_path, capsys, monkeypatch):
    """A read-only parent: refused before any work. Root writes through a 0555 mode bit, so there
    the kernel's answer is stood in for: os.access (what the check asks) says no."""
    import os

    import scan_export.onnx.output_dir as output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(output_dir.os, "access", lambda p, m, **k: False if Path(p) == ro else real(p, m, **k))
    ro.chmod(0o555)
    try:
        assert main(["export-model", str(built["ckpt"]), "--out", str(ro / "o")]) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]
    assert list(ro.iterdir()) == []


def test_quantize_beyond_memory_is_refused_with_the_estimate(built, tmp_path, monkeypatch, capsys):
    """A quantized export holds the weights in memory: refused up front when they cannot fit
    (available memory stood in for: 1 kB)."""
    import scan_export.resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda: 1000)
    assert main(["export-model", str(built["ckpt"]), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize int8 would need" in err[0] and "1.0 kB" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_export_with_one_warning_line(built, tmp_path, capsys):
    """NaN / Inf in a weight is loadable, so it exports, with one warning line naming the tensor."""
    import math

    from safetensors.torch import load_file, save_file

    c = _ckpt(tmp_path, built)
    d = load_file(str(c / "model.safetensors"))
    d["backbone.layers.1.mixer.in_proj.weight"][3, 3] = math.nan
    d["backbone.layers.1.mixer.D"][0] = math.inf
    save_file(d, str(c / "model.safetensors"), metadata={"format": "pt"})
    assert main(["export-model", str(c), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "backbone.layers.1.mixer.D" in err[0] and "1 more" in err[0], err


def test_debug_shows_the_traceback(built, tmp_path):
    """--debug is the way to see where an error came from: the exception propagates."""
    from scan_export.errors import ScanExportError

    with pytest.raises(ScanExportError, match="nope"):
        main(["--debug", "generate", str(tmp_path / "nope"), "--input-ids", "1", "--max-new-tokens", "1"])
