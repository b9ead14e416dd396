"""Qwen3.5 text (issue 22): Gated DeltaNet layers and gated attention, exported and compared against
transformers' Qwen3_5ForCausalLM on a tiny random checkpoint (tiny.TINY_QWEN3_5: 4 layers, attention
at layer 1, DeltaNet with 2 key heads / 4 value heads (GQA in the delta rule), attention GQA 4:2,
partial RoPE 0.25, head_dim 16 ≠ hidden / heads). One module-scoped export (~20 s on 2 cores).
"""

import json

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Qwen3.5 tests compare against transformers")

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.reference.models import load_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .hybrid_checks import (assert_greedy_tokens_match, LOGITS_RTOL, PROMPTS, assert_logits_match,  # noqa: E402
                            assert_prefill_then_decode_equals_one_prefill, assert_ragged_equals_singles)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5")
    ckpt = make_tiny_checkpoint(root / "ckpt", "qwen3_5_text")
    out = export_model(ckpt, root / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    return ckpt, out, hf, ExportedModel(out)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    _, _, hf, model = exported
    assert_logits_match(hf, model, seqlen)


def test_greedy_tokens_match_transformers(exported):
    _, _, hf, model = exported
    # transformers' cached decode (its recurrent step, another code path than its chunked
    # prefill) and its full forward agree on this model (checked here), so the referee is unambiguous.
    assert_greedy_tokens_match(hf, model)


def test_ragged_batch_equals_single_prompts(exported):
    """Prompts of unequal length are prefilled apart (generate groups equal lengths), so no padding
    reaches a DeltaNet layer; the KV caches are left-padded and masked when stacked."""
    _, _, _, model = exported
    assert_ragged_equals_singles(model)


def test_prefill_then_decode_equals_one_long_prefill(exported):
    _, _, _, model = exported
    assert_prefill_then_decode_equals_one_prefill(model)


def test_verify_passes(exported):
    ckpt, out, _, _ = exported
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()


def test_description_is_the_io_contract(exported):
    _, out, _, _ = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["layer_kinds"] == ["gated_deltanet", "attention", "gated_deltanet", "gated_deltanet"]
    gdn, attn = desc["state"][0], desc["state"][1]
    # conv channels: q, k (2 heads of 16 each) and v (4 heads of 16); the state is (h, dk, dv)
    assert gdn["conv_state"]["shape"] == ["batch", 3, 128] and gdn["conv_state"]["dtype"] == "float32"
    assert gdn["ssm_state"]["shape"] == ["batch", 4, 16, 16] and gdn["ssm_state"]["init"] == "zeros"
    assert "delta-rule" in gdn["ssm_state"]["meaning"]
    assert attn["key"]["shape"] == ["batch", 2, "past_seqlen", 16]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    # one Scan per DeltaNet layer, whatever the length
    assert sum(n.op_type == "Scan" for n in graph.node) == 3


def test_node_count_does_not_depend_on_export_length(exported, tmp_path):
    ckpt, out, _, _ = exported
    other = export_model(ckpt, tmp_path / "e", example_seqlen=5)
    count = lambda d: len(onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node)  # noqa: E731
    assert count(other) == count(out)


def test_reference_decode_matches_transformers_cached_decode(exported):
    """Our torch reference stepped one token at a time against transformers' cached path (its
    recurrent step, another code path than its chunked prefill)."""
    ckpt, _, hf, _ = exported
    ours = load_model(ckpt)
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 12)))
    with torch.no_grad():
        out = hf(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), use_cache=True)
        cache, ref = out.cache, []
        _, *state = ours(ids[:, :6], torch.ones_like(ids[:, :6]), *ours.zero_state(2))
        got = []
        for t in range(6, 12):
            out = hf(ids[:, t:t + 1], attention_mask=torch.ones_like(ids[:, :t + 1]), cache=cache, use_cache=True)
            cache = out.cache
            ref.append(out.logits[:, -1])
            step, *state = ours(ids[:, t:t + 1], torch.ones_like(ids[:, :t + 1]), *state)
            got.append(step[:, -1])
    got, ref = torch.stack(got, 1), torch.stack(ref, 1)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < LOGITS_RTOL, f"decode logits rel error {rel:.2e}"


def test_unknown_layer_type_is_refused(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "qwen3_5_text")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["layer_types"][2] = "sliding_attention"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScanExportError, match="field 'layer_types': layer 2 is 'sliding_attention'"):
        load_model(ckpt)


def test_fp16_export_runs_near_transformers(exported, tmp_path):
    ckpt, _, hf, _ = exported
    model = ExportedModel(export_model(ckpt, tmp_path / "e", dtype="fp16"))
    ids = np.random.default_rng(5).integers(0, model.vocab_size, (2, 9))
    logits, state = model.forward(ids, model.zero_state(2))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.ones(2, 9, dtype=torch.long)).logits.numpy()
    rel = np.abs(logits.astype(np.float64) - ref).max() / np.abs(ref).max()
    # fp16 weights and activations (the delta-rule state stays float32): 11-bit mantissas over 4 layers
    assert rel < 2e-2, f"fp16 logits rel error {rel:.2e}"
    assert state[0].dtype == np.float16 and state[1].dtype == np.float32
    assert len(generate(model, PROMPTS[:1], 8)[0]) == 8


def test_int4_export_matches_the_numpy_dequantized_reference(exported, tmp_path):
    """Judged as tests/test_quantize.py judges Mamba's: on this random, sharpened model 4-bit weights move
    the logits by ~80% from fp32 (measured), as any perturbation would, so the referee is the fp32 export
    with its weights dequantized in numpy (test_quantize.reference_export). At accuracy level 1 the
    activations stay fp32 and only summation order differs: 1e-5 (a wrong layout, block or scale errs
    by order 1). The default level 4 export must build, quantize the DeltaNet and gated-attention
    projections, and generate."""
    import shutil

    from scan_export.onnx.quantize import quantize_file

    from .test_quantize import BLOCK, logits, reference_export, rel_err

    ckpt, fp32, _, _ = exported
    ref = logits(reference_export(fp32, 4, tmp_path / "ref", tied=False))  # the tiny Qwen3.5 is untied
    assert rel_err(logits(fp32), ref) > 1e-3  # the reference really is quantized
    level1 = tmp_path / "level1"
    shutil.copytree(fp32, level1)
    quantize_file(level1 / "model.onnx", 4, BLOCK, 1, single_file=True)
    assert rel_err(logits(level1), ref) < 1e-5
    out = export_model(ckpt, tmp_path / "e", quantize="int4")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 10
    model = ExportedModel(out)
    logits_, _ = model.forward(np.array([[5, 6, 7]]), model.zero_state(1))
    assert np.isfinite(logits_).all() and len(generate(model, PROMPTS[:1], 8)[0]) == 8


def test_scan_form_is_refused(exported, tmp_path):
    with pytest.raises(ScanExportError, match="whose delta rule has one export form"):
        export_model(exported[0], tmp_path / "out", scan_form="chunked")


def test_genai_target_generates_our_tokens(tmp_path):
    from .test_genai import GENAI_MISSING, HYBRID_TOKENS, N_TOKENS, PROMPTS as GENAI_PROMPTS, with_special_tokens
    if GENAI_MISSING:
        pytest.skip(GENAI_MISSING)
    from scan_export.runtime.genai import GenaiModel, generate_genai

    ckpt = with_special_tokens(make_tiny_checkpoint(tmp_path / "ckpt", "qwen3_5_text"), HYBRID_TOKENS)
    out = export_model(ckpt, tmp_path / "export", target="genai")
    ours, theirs = ExportedModel(out), GenaiModel(out)
    want = [generate(ours, [p], N_TOKENS)[0] for p in GENAI_PROMPTS]
    assert all(len(t) == N_TOKENS and 250 not in t for t in want)  # nothing stopped early
    for prompt, tokens in zip(GENAI_PROMPTS, want):
        assert generate_genai(theirs, [prompt], N_TOKENS) == [tokens]


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """The released layout: config.json with text_config (+ vision_config), the language model's
    weights under model.language_model., a vision tower under model.visual. (transformers'
    Qwen3_5ForConditionalGeneration save_pretrained)."""
    root = tmp_path_factory.mktemp("qwen3_5_mm")
    ckpt = make_tiny_checkpoint(root / "ckpt", "qwen3_5")
    hf = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(str(ckpt)).eval()
    return ckpt, export_model(ckpt, root / "export"), hf


@pytest.mark.parametrize("seqlen", [1, 64])
def test_multimodal_checkpoint_exports_its_language_model(multimodal, seqlen):
    ckpt, out, hf = multimodal
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert [i["name"] for i in desc["inputs"]][:2] == ["input_ids", "attention_mask"]  # tokens only, no pixels
    assert_logits_match(hf, ExportedModel(out), seqlen)


def test_multimodal_verify_passes(multimodal):
    ckpt, out, _ = multimodal
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()


def test_refused_configs_exit_2_with_one_line(tmp_path, capsys):
    from scan_export.cli import main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "qwen3_5_text")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "linear_num_value_heads": 3}))
    assert main(["export-model", str(ckpt), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "linear_num_value_heads" in err and "multiple of linear_num_key_heads (2), got 3" in err
    assert len(err.splitlines()) == 1
    mm = make_tiny_checkpoint(tmp_path / "mm", "qwen3_5")
    cfg = json.loads((mm / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], "linear_key_head_dim": 0}}))
    assert main(["export-model", str(mm), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'linear_key_head_dim'" in err and len(err.splitlines()) == 1
