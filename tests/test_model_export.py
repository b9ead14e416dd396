"""Whole-model export of HF Mamba / FalconMamba checkpoints, and generation in onnxruntime."""

import json
import re
from pathlib import Path
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the model tests compare against transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel, Sampling, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .test_export_module import op_histogram  # noqa: E402

# (model_type, config overrides, export options): Mamba-1 in both scan forms, FalconMamba, and
# Mamba-2 with one and two groups.
MODELS = [("mamba", {}, {}), ("mamba", {}, {"scan_form": "chunked"}), ("falcon_mamba", {}, {}),
          ("mamba2", {"n_groups": 1}, {}), ("mamba2", {"n_groups": 2}, {})]
HF_CLASSES = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [42]]
# fp32 export vs transformers fp32: same algebra, different kernels; measured ~6e-7 (README).
LOGITS_RTOL = 1e-4


@pytest.fixture(scope="module", params=MODELS,
                ids=lambda m: m[0] + "".join(f"-{v}" if k == "scan_form" else f"-{k}{v}" for k, v in {**m[1], **m[2]}.items()))
def exported(request, tmp_path_factory):
    model_type, overrides, options = request.param
    root = tmp_path_factory.mktemp(model_type)
    ckpt = make_tiny_checkpoint(root / "ckpt", model_type, **overrides)
    out = export_model(ckpt, root / "export", **options)
    hf = getattr(transformers, HF_CLASSES[model_type]).from_pretrained(str(ckpt)).eval()
    return ckpt, out, hf, ExportedModel(out)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    _, _, hf, model = exported
    ids = np.random.default_rng(seqlen).integers(0, model.vocab_size, (2, seqlen))
    logits, _ = model.forward(ids, model.zero_state(2))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel < LOGITS_RTOL, f"logits rel error {rel:.2e} at seqlen {seqlen}"


def test_greedy_tokens_match_transformers_generate(exported):
    _, _, hf, model = exported
    ours = generate(model, PROMPTS, 32)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
        assert got == want
    assert len({tuple(t) for t in ours}) == 3 and all(len(set(t)) > 4 for t in ours)  # not a degenerate model


def test_ragged_batch_equals_single_prompts(exported):
    _, _, _, model = exported
    batched = generate(model, PROMPTS, 32)
    singles = [generate(model, [p], 32)[0] for p in PROMPTS]
    assert batched == singles


def test_prefill_then_decode_equals_one_long_prefill(exported):
    _, _, _, model = exported
    ids = np.random.default_rng(1).integers(0, model.vocab_size, (2, 40))
    full, full_state = model.forward(ids, model.zero_state(2))
    _, state = model.forward(ids[:, :30], model.zero_state(2))
    steps = []
    for t in range(30, 40):
        logits, state = model.forward(ids[:, t:t + 1], state)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 30:], rtol=0, atol=1e-4 * np.abs(full).max())
    for a, b in zip(state, full_state):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))


def test_logits_to_keep_restricts_the_lm_head_to_the_last_positions(exported):
    _, _, _, model = exported
    ids = np.random.default_rng(2).integers(0, model.vocab_size, (2, 9))
    full, full_state = model.forward(ids, model.zero_state(2))
    for k, want in [(1, full[:, -1:]), (3, full[:, -3:]), (9, full), (50, full)]:
        logits, state = model.forward(ids, model.zero_state(2), logits_to_keep=k)
        assert logits.shape == want.shape
        # The same rows of the same MatMul; only a GEMM's blocking for fewer rows could differ.
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-6 * np.abs(full).max())
        for a, b in zip(state, full_state):
            np.testing.assert_array_equal(a, b)  # the layers before the lm_head are untouched
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model.forward(ids, model.zero_state(2), logits_to_keep=-1)


def test_runtime_reads_exports_without_logits_to_keep(exported, tmp_path):
    """A version-1 export has no logits_to_keep input: the runtime computes every position and slices."""
    import shutil

    _, out, _, model = exported
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    proto = onnx.load(str(old / "model.onnx"))
    keep = next(i for i in proto.graph.input if i.name == "logits_to_keep")
    proto.graph.input.remove(keep)
    proto.graph.node.insert(0, onnx.helper.make_node(
        "Constant", [], ["logits_to_keep"], value=onnx.numpy_helper.from_array(np.array(0, np.int64))))
    onnx.save(proto, str(old / "model.onnx"))
    desc = json.loads((old / DESCRIPTION_FILE).read_text())
    desc["version"] = 1
    desc["inputs"] = [i for i in desc["inputs"] if i["name"] != "logits_to_keep"]
    (old / DESCRIPTION_FILE).write_text(json.dumps(desc))
    v1 = ExportedModel(old)
    ids = np.random.default_rng(3).integers(0, model.vocab_size, (1, 6))
    full, _ = model.forward(ids, model.zero_state(1))
    last, _ = v1.forward(ids, v1.zero_state(1), logits_to_keep=2)
    np.testing.assert_array_equal(last, full[:, -2:])  # the same graph, sliced after the fact
    assert generate(v1, PROMPTS, 8) == generate(model, PROMPTS, 8)


def test_verify_passes(exported):
    ckpt, out, _, _ = exported
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()
    assert len(report.states) == 4 and len(report.logits) == 4


def test_description_is_the_io_contract(exported):
    _, out, _, model = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    graph = onnx.load(str(out / desc["model_file"]), load_external_data=False).graph
    assert [i["name"] for i in desc["inputs"]] == [i.name for i in graph.input]
    assert [o["name"] for o in desc["outputs"]] == [o.name for o in graph.output]
    assert desc["num_layers"] == 2 and len(desc["state"]) == 2 and desc["vocab_size"] == 256
    assert desc["ir_version"] <= 10 and desc["opset"] <= 21


def test_node_count_does_not_depend_on_export_length(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    a = export_model(ckpt, tmp_path / "a", example_seqlen=4)
    b = export_model(ckpt, tmp_path / "b", example_seqlen=96)
    ha, hb = (op_histogram(onnx.load(str(p / "model.onnx"))) for p in (a, b))
    assert ha == hb
    assert ha["Scan"] == 2 and ha["Loop"] == 0  # one Scan over time per layer, no per-token unrolling
    m2 = make_tiny_checkpoint(tmp_path / "m2", "mamba2")
    c = export_model(m2, tmp_path / "c", example_seqlen=4)
    d = export_model(m2, tmp_path / "d", example_seqlen=96)
    hc, hd = (op_histogram(onnx.load(str(p / "model.onnx"))) for p in (c, d))
    assert hc == hd and hc["Loop"] == 2


def test_generation_runs_where_torch_cannot_be_imported(exported):
    _, out, _, model = exported
    want = generate(model, [PROMPTS[0]], 12)[0]
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from scan_export.cli import main\n"
        f"sys.exit(main(['generate', {str(out)!r}, '--input-ids', '5,6,7', '--max-new-tokens', '12', '--json']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1])["tokens"] == want
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "import of torch halted" in probe.stderr


def test_sampling_is_seeded_and_filters(exported):
    _, _, _, model = exported
    s = Sampling(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    a, b = generate(model, PROMPTS, 16, sampling=s), generate(model, PROMPTS, 16, sampling=s)
    assert a == b
    assert generate(model, PROMPTS, 16, sampling=Sampling(do_sample=True, top_k=1, seed=5)) == generate(model, PROMPTS, 16)


def test_stop_token_and_streaming(exported):
    _, _, _, model = exported
    free = generate(model, [PROMPTS[1]], 20)[0]
    stop = free[5]
    streamed = []
    got = generate(model, [PROMPTS[1]], 20, stop_token_id=stop, on_token=lambda r, t: streamed.append((r, t)))[0]
    assert got == free[: free.index(stop) + 1] and streamed == [(0, t) for t in got]


def test_cli_generate_json_and_stream(exported, capsys):
    _, out, _, model = exported
    want = generate(model, [[5, 6, 7]], 6)[0]
    assert main(["generate", str(out), "--input-ids", "5,6,7", "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tokens": want, "text": None}
    assert main(["generate", str(out), "--input-ids", "5,6,7", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want]


def test_token_id_out_of_vocab_is_refused(exported, capsys):
    _, out, _, model = exported
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 256\) \(vocab_size\), got token id 256"):
        generate(model, [[1, 256]], 3)
    assert main(["generate", str(out), "--input-ids", "1,999", "--max-new-tokens", "2"]) == 2
    assert "vocab_size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)


def test_prompt_needs_a_tokenizer(exported, capsys):
    _, out, _, _ = exported
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_bad_checkpoints_give_clear_errors_and_no_partial_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not exist"):
        export_model(tmp_path / "nope", out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    from scan_export.reference.models.families import model_types

    # every registered family, in the order users see them (the registry's; test_family_registry pins it)
    with pytest.raises(ValueError, match=re.escape(f"field 'model_type': expected one of {model_types()}, got 'llama'")):
        export_model(bad, out)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="has no weights"):
        export_model(ckpt, out)
    assert not out.exists() and _no_leftovers(tmp_path) == []


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    (shard,) = ckpt.glob("*.safetensors")
    state = load_file(str(shard))
    del state["backbone.layers.1.mixer.A_log"]
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 1 weight.*backbone.layers.1.mixer.A_log"):
        export_model(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pytorch_model_bin_and_external_data(tmp_path):
    from safetensors.torch import load_file

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "falcon_mamba")
    (shard,) = ckpt.glob("*.safetensors")
    torch.save(load_file(str(shard)), ckpt / "pytorch_model.bin")
    shard.unlink()
    out = export_model(ckpt, tmp_path / "out", external_data_bytes=0)  # force the > 2 GB layout
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    big = [t for t in graph.initializer if t.dims and np.prod(t.dims) * 4 > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert (out / "model.onnx.data").stat().st_size >= sum(int(np.prod(t.dims)) * 4 for t in big)
    model = ExportedModel(out)
    hf = transformers.FalconMambaForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = np.array([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(model.forward(ids, model.zero_state(1))[0] - ref).max() / np.abs(ref).max() < LOGITS_RTOL


def test_export_replaces_a_previous_export_but_never_foreign_files(tmp_path):
    """A folder of the user's is refused untouched; a previous export is replaced (the rules in
    detail: tests/test_output_safety.py)."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="not empty and holds no previous export"):
        export_model(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["stale.txt"]
    (out / "stale.txt").unlink()
    export_model(ckpt, out)
    export_model(ckpt, out, dtype="fp16")
    assert json.loads((out / DESCRIPTION_FILE).read_text())["dtype"] == "float16"
    assert _no_leftovers(tmp_path) == []


def test_fp16_export_runs(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out16 = export_model(ckpt, tmp_path / "fp16", dtype="fp16")
    report = verify_export(out16, ckpt, prompt_lengths=(1, 33), n_tokens=8, n_prompts=1)
    # fp16 weights and activations against fp32 transformers: the final cast dominates (~1e-3).
    assert all(m.rel < 2e-2 for m in report.logits), report.format()


@pytest.mark.parametrize("model_type", ["mamba", "mamba2"])
def test_demo_runs_end_to_end(capsys, model_type):
    assert main(["demo", "--tokens", "5", "--model-type", model_type]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    # the paths it printed were in a temporary folder: gone, and the output says so
    ckpt = Path(out.split("1. checkpoint", 1)[1].split()[0])
    assert not ckpt.exists() and "now removed; --workdir DIR keeps them" in out


def test_mamba2_native_lowering_export_verifies(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mamba2", n_groups=2)
    out = tmp_path / "native"
    assert main(["export-model", str(ckpt), "--out", str(out), "--target", "ort-1.32", "--lowering", "native"]) == 0
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["lowering"] == "native" and desc["opset"] == 27
    ops = op_histogram(onnx.load(str(out / "model.onnx")))
    assert ops["LinearAttention"] == 2 and ops["CausalConvWithState"] == 2 and ops["Loop"] == 0
    report = verify_export(out, ckpt, n_tokens=16, n_prompts=2)
    assert report.passed, report.format()
    assert main(["export-model", str(ckpt), "--out", str(tmp_path / "x"), "--lowering", "native"]) == 2
    assert "needs opset >= 27" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_model_scan_form_flag(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "chunked"
    assert main(["export-model", str(ckpt), "--out", str(out), "--scan-form", "chunked"]) == 0
    assert json.loads((out / DESCRIPTION_FILE).read_text())["scan_form"] == "chunked"
    ops = op_histogram(onnx.load(str(out / "model.onnx")))
    assert ops["Loop"] == 2 and ops["Scan"] == 0
    assert main(["export-model", str(ckpt), "--out", str(tmp_path / "x"), "--scan-form", "parallel"]) == 2
    assert "invalid choice: 'parallel'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scan_form: expected one of"):
        export_model(ckpt, tmp_path / "y", scan_form="parallel")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("model_type", ["mamba", "mamba2"])
def test_model_bench_reports_ratios_and_floor(model_type):
    from scan_export.bench.model import bench_model, format_model_bench

    results = bench_model(configs=("tiny",), prefill_len=16, decode_tokens=2, repeats=1, model_type=model_type)
    (m,) = results["models"]
    assert m["prefill_speedup"] > 0 and m["decode_speedup"] > 0 and m["decode_floor_ms"] > 0
    assert model_type in format_model_bench(results)


def test_prompt_text_goes_through_the_copied_tokenizer(tmp_path, capsys):
    """A checkpoint with tokenizer.json: export copies it, `generate --prompt` encodes and decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "mamba", "scan", "state"] + [f"w{i}" for i in range(250)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    tok.save(str(ckpt / "tokenizer.json"))
    out = export_model(ckpt, tmp_path / "export")
    assert (out / "tokenizer.json").is_file()
    want = generate(ExportedModel(out), [[1, 2, 3]], 5)[0]  # "hello world mamba"
    assert main(["generate", str(out), "--prompt", "hello world mamba", "--max-new-tokens", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == want and got["text"] == tok.decode(want)
