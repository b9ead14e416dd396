"""LFM2 (issue 22): gated short-convolution layers (a new layer kind, `shortconv`, whose cache is one
conv_state) and GQA attention with per-head q/k RMSNorm, exported and compared against
transformers' Lfm2ForCausalLM on tiny random checkpoints.

Exports (two, module-scoped; ~10 s each on 2 cores), both with 4 layers conv, attention, conv,
attention, GQA 4:2 and the feed-forward width auto-adjusted (tiny.TINY_LFM2: 100 -> 80):
  tied:   tied embeddings (LFM2's default)
  untied: untied embeddings, conv_bias on (in_proj, the conv and out_proj), kernel 4
"""

import json

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the LFM2 tests compare against transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.reference.models import load_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .hybrid_checks import (assert_greedy_tokens_match, PROMPTS, assert_logits_match,  # noqa: E402
                            assert_prefill_then_decode_equals_one_prefill, assert_ragged_equals_singles)
from .test_export_module import op_histogram  # noqa: E402

MODELS = {
    "tied": dict(),
    "untied": dict(tie_word_embeddings=False, conv_bias=True, conv_L_cache=4),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / "ckpt", "lfm2", **MODELS[request.param])
    out = export_model(ckpt, root / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    return ckpt, out, hf, ExportedModel(out)


def test_tiny_checkpoint_is_what_the_tests_claim(exported):
    ckpt, _, hf, _ = exported
    cfg = hf.config
    assert cfg.layer_types == ["conv", "full_attention", "conv", "full_attention"]
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert hf.model.layers[0].feed_forward.w1.out_features == 80  # int(2·100/3) = 66, rounded up to 16s
    ours = set(dict(load_model(ckpt).named_parameters()))
    theirs = set(dict(hf.named_parameters()))
    assert ours == theirs, ours ^ theirs  # our parameter names are the checkpoint's (RENAMES is empty)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    _, _, hf, model = exported
    assert_logits_match(hf, model, seqlen)


def test_greedy_tokens_match_transformers_generate(exported):
    _, _, hf, model = exported
    # transformers' cached decode (its conv-state update and KV cache) and its full forward
    # agree on these models (checked here), so the referee is unambiguous.
    assert_greedy_tokens_match(hf, model)


def test_ragged_batch_equals_single_prompts(exported):
    _, _, _, model = exported
    assert_ragged_equals_singles(model)


def test_prefill_then_decode_equals_one_long_prefill(exported):
    _, _, _, model = exported
    assert_prefill_then_decode_equals_one_prefill(model)


def test_verify_passes(exported):
    ckpt, out, _, _ = exported
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()
    # conv_state of each conv layer, key and value of each attention layer, all judged against transformers' cache
    assert len(report.states) == 2 * 1 + 2 * 2


def test_description_is_the_io_contract(exported):
    ckpt, out, hf, _ = exported
    k = hf.config.conv_L_cache
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    graph = onnx.load(str(out / desc["model_file"]), load_external_data=False).graph
    assert [i["name"] for i in desc["inputs"]] == [i.name for i in graph.input]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    assert desc["layer_kinds"] == ["shortconv", "attention", "shortconv", "attention"]
    for entry in desc["state"]:
        i = entry["layer"]
        if entry["kind"] == "shortconv":
            assert set(entry) == {"layer", "kind", "conv_state"} and entry["conv_state"]["init"] == "zeros"
            assert dims[f"past.{i}.conv_state"] == dims[f"present.{i}.conv_state"] == ["batch", k - 1, 64]
        else:
            assert dims[f"past_key_values.{i}.key"] == ["batch", 2, "past_seqlen", 16]
    names = [i.name for i in graph.input][2:-1]
    assert names == ["past.0.conv_state", "past_key_values.1.key", "past_key_values.1.value", "past.2.conv_state",
                     "past_key_values.3.key", "past_key_values.3.value"]


# ------------------------------------------------------------------------------------------------
# Further exports of the tied model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lfm2") / "ckpt", "lfm2")


def test_node_count_does_not_depend_on_export_length(ckpt, tmp_path):
    a = export_model(ckpt, tmp_path / "a", example_seqlen=4)
    b = export_model(ckpt, tmp_path / "b", example_seqlen=96)
    ha, hb = (op_histogram(onnx.load(str(p / "model.onnx"))) for p in (a, b))
    assert ha == hb
    assert ha["Loop"] == ha["Scan"] == 0  # no recurrence to loop over: the conv is K slices


def rel(got, ref) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def test_fp16_export_runs_near_fp32(ckpt, tmp_path):
    fp32 = ExportedModel(export_model(ckpt, tmp_path / "fp32"))
    fp16 = ExportedModel(export_model(ckpt, tmp_path / "fp16", dtype="fp16"))
    ids = np.random.default_rng(0).integers(0, 256, (2, 40))
    ref, _ = fp32.forward(ids, fp32.zero_state(2))
    got, state = fp16.forward(ids, fp16.zero_state(2))
    assert state[0].dtype == np.float16  # the runtime hands logits back as float32; the cache stays fp16
    assert fp16.description["dtype"] == "float16"
    # fp16 rounds every activation to 11 bits (~5e-4 each) through 4 layers; measured 3.0e-3.
    assert rel(got, ref) < 2e-2
    assert len(generate(fp16, PROMPTS, 8)[0]) == 8


@pytest.mark.parametrize("quantize,bits", [("int8", 8), ("int4", 4)])
def test_quantized_export_matches_the_numpy_dequantized_reference(ckpt, tmp_path, quantize, bits):
    """Judged as tests/test_quantize.py judges Mamba's (random weights are chaotic, so greedy tokens
    are not compared with fp32): against the fp32 export with its weights dequantized in numpy
    (test_quantize.reference_export, the tied table included). Level 1 keeps activations fp32, so
    only summation order differs: 1e-5. The default level 4 also rounds activations to int8 per
    block, an error that adds up over every MatMul: test_quantize's 5e-2 for 2 layers, doubled for
    these 4 (measured 4.2e-2 int8, 5.1e-2 int4); a wrong layout, block or scale errs by order 1."""
    import shutil

    from scan_export.onnx.quantize import quantize_file

    from .test_quantize import BLOCK, logits, reference_export, rel_err

    fp32 = export_model(ckpt, tmp_path / "fp32")
    ref = logits(reference_export(fp32, bits, tmp_path / "ref"))
    assert rel_err(logits(fp32), ref) > 1e-3  # the reference really is quantized
    level1 = tmp_path / "level1"
    shutil.copytree(fp32, level1)
    quantize_file(level1 / "model.onnx", bits, BLOCK, 1, single_file=True)
    assert rel_err(logits(level1), ref) < 1e-5
    out = export_model(ckpt, tmp_path / quantize, quantize=quantize)
    err = rel_err(logits(out), ref)
    print(f"{quantize} level 4 vs dequantized reference: {err:.2e}")
    assert err < 1e-1, err
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name for t in model.graph.initializer}
    # every weight MatMul quantized (attention's q·k and p·v MatMuls take activations only)
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node)
    assert [n.op_type for n in model.graph.node].count("GatherBlockQuantized") == 1  # the tied table
    assert len(generate(ExportedModel(out), PROMPTS, 8)[0]) == 8


def test_genai_generates_our_greedy_tokens(tmp_path):
    from .test_genai import HYBRID_TOKENS, N_TOKENS, PROMPTS as GENAI_PROMPTS, GENAI_MISSING, with_special_tokens
    from scan_export.runtime.genai import GENAI_CONFIG_FILE, GenaiModel, generate_genai

    if GENAI_MISSING is not None:
        pytest.skip(GENAI_MISSING)
    ckpt = with_special_tokens(make_tiny_checkpoint(tmp_path / "ckpt", "lfm2"), HYBRID_TOKENS)
    out = export_model(ckpt, tmp_path / "export", target="genai")
    decoder = json.loads((out / GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
    assert decoder["inputs"]["past_conv_names"] % 0 == "past.0.conv_state"
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    # genai's "lfm2" type: its generic decoder finds recurrent layers by an ssm_state we do not have
    assert decoder["layer_types"] == ["conv", "full_attention", "conv", "full_attention"]
    assert decoder["conv_cache_size"] == 2
    ours, theirs = ExportedModel(out), GenaiModel(out)
    want = [generate(ours, [p], N_TOKENS)[0] for p in GENAI_PROMPTS]
    assert all(len(t) == N_TOKENS and 250 not in t for t in want)  # nothing stopped early
    assert len({tuple(t) for t in want}) == 2 and all(len(set(t)) > 4 for t in want)  # not a degenerate model
    for prompt, tokens in zip(GENAI_PROMPTS, want):
        assert generate_genai(theirs, [prompt], N_TOKENS) == [tokens]
    assert generate_genai(theirs, GENAI_PROMPTS, N_TOKENS) == want  # a batch of two: rows stay independent


# ------------------------------------------------------------------------------------------------
# Refused configs: one line naming the field, exit 2


def _with_config(ckpt, tmp_path, **changes):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **changes}))
    return bad


@pytest.mark.parametrize("changes,message", [
    (dict(layer_types=["conv", "sliding_attention", "conv", "full_attention"]),
     "field 'layer_types': expected each of ['conv', 'full_attention'], got 'sliding_attention' at layer 1"),
    (dict(layer_types=["conv", "conv"]), "field 'layer_types': expected a list of 4 (num_hidden_layers) names"),
    (dict(conv_L_cache=1), "field 'conv_L_cache': expected an integer in [2, 64], got 1"),
    (dict(num_key_value_heads=3), "fields num_attention_heads / num_key_value_heads: expected a multiple, got 4 / 3"),
])
def test_refused_configs_exit_2_with_one_line(ckpt, tmp_path, capsys, changes, message):
    bad = _with_config(ckpt, tmp_path, **changes)
    with pytest.raises(ScanExportError, match=None) as e:
        load_model(bad)
    assert message in str(e.value)
    assert main(["export-model", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_scan_form_is_refused(ckpt, tmp_path):
    with pytest.raises(ScanExportError, match="which has no scan"):
        export_model(ckpt, tmp_path / "out", scan_form="chunked")


def test_reference_decode_matches_transformers_decode(ckpt):
    """transformers' one-token step is another code path (causal_conv1d_update on its conv state):
    our reference, prefill then single steps, against it step by step."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    model = load_model(ckpt)
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 20)))
    with torch.no_grad():
        out = hf(ids[:, :12], attention_mask=torch.ones_like(ids[:, :12]), use_cache=True)
        cache, theirs = out.cache, []
        _, *state = model(ids[:, :12], torch.ones_like(ids[:, :12]), *model.zero_state(2))
        mine = []
        for t in range(12, 20):
            out = hf(ids[:, t:t + 1], attention_mask=torch.ones_like(ids[:, :t + 1]), cache=cache, use_cache=True)
            cache = out.cache
            theirs.append(out.logits[:, -1])
            step, *state = model(ids[:, t:t + 1], torch.ones_like(ids[:, :t + 1]), *state)
            mine.append(step[:, -1])
    a, b = torch.stack(mine, 1), torch.stack(theirs, 1)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5  # fp32 both, same algebra: rounding only
