"""Falcon-H1 (issue 11): Mamba-2 and attention in parallel in every layer, with every µP multiplier,
exported and compared against transformers' FalconH1ForCausalLM on tiny random checkpoints.

Exports (two, module-scoped; each takes ~45 s on 2 cores), both with every multiplier ≠ 1
(tiny.TINY_FALCON_H1), head_dim 24 ≠ hidden / heads, mamba_d_ssm 96 ≠ expand · hidden, 2 groups:
  tied:   tied embeddings, GQA 4:2, mamba_rms_norm with norm_before_gate (norm, then the silu gate)
  untied: untied embeddings, multi-head attention (kv = heads), gate then norm
          (mamba_norm_before_gate False), every bias on (attention, MLP, Mamba in_proj, projectors)
Without an export (the torch reference against transformers, cheap): mamba_rms_norm off (the gate
alone; transformers' decode step gates inside its state update), and head_dim / mamba_d_ssm absent.
"""

import json

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Falcon-H1 tests compare against transformers")

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.reference.models import load_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel  # noqa: E402
from scan_export import tiny  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .hybrid_checks import (assert_greedy_tokens_match, LOGITS_RTOL, assert_logits_match,  # noqa: E402
                            assert_prefill_then_decode_equals_one_prefill, assert_ragged_equals_singles)

MODELS = {
    # Tied embeddings × 5 (the tiny default) make this random model echo its input; × 2 does not.
    "tied": dict(tie_word_embeddings=True, embedding_multiplier=2.0),
    "untied": dict(num_key_value_heads=4, mamba_norm_before_gate=False, attention_bias=True, mlp_bias=True,
                   mamba_proj_bias=True, projectors_bias=True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / "ckpt", "falcon_h1", **MODELS[request.param])
    out = export_model(ckpt, root / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    return ckpt, out, hf, ExportedModel(out)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    _, _, hf, model = exported
    assert_logits_match(hf, model, seqlen)


def test_greedy_tokens_match_transformers_generate(exported):
    _, _, hf, model = exported
    # transformers' cached decode (its KV cache and Mamba state update) and its full forward
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
    # conv, ssm, key and value of each of the two layers, all judged against transformers' cache
    assert len(report.states) == 8 and len(report.logits) == 4


def test_description_is_the_io_contract(exported):
    _, out, _, _ = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    graph = onnx.load(str(out / desc["model_file"]), load_external_data=False).graph
    assert [i["name"] for i in desc["inputs"]] == [i.name for i in graph.input]
    assert [o["name"] for o in desc["outputs"]] == [o.name for o in graph.output]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    assert desc["layer_kinds"] == ["mamba2+attention"] * 2
    assert desc["intermediate_size"] == 96 and desc["attention"]["head_dim"] == 24  # mamba_d_ssm, head_dim
    for entry in desc["state"]:
        i = entry["layer"]
        assert entry["kind"] == "mamba2+attention"
        assert entry["conv_state"]["init"] == entry["ssm_state"]["init"] == "zeros"
        assert dims[f"past.{i}.conv_state"] == ["batch", 3, 96 + 2 * 2 * 16]  # K−1, d_ssm + 2·groups·n
        assert dims[f"past.{i}.ssm_state"] == ["batch", 8, 12, 16]
        kv = entry["key"]["shape"][1]
        assert dims[f"past_key_values.{i}.key"] == ["batch", kv, "past_seqlen", 24]
        assert dims[f"present.{i}.value"] == ["batch", kv, "total_seqlen", 24] and entry["value"]["init"] == "empty"
    # graph order: per layer conv, ssm, key, value
    names = [i.name for i in graph.input][2:-1]
    assert names == [f"{p}.{i}.{t}" for i in range(2) for p, t in
                     (("past", "conv_state"), ("past", "ssm_state"), ("past_key_values", "key"),
                      ("past_key_values", "value"))]
    assert desc["version"] == 4 and len(desc["state"]) == desc["num_layers"] == 2


# ------------------------------------------------------------------------------------------------
# The torch reference alone (no export)


def hf_decode_logits(hf, ids, steps):
    """transformers: prefill ids[:, :-steps] with its cache, then one token per call. -> (b, steps, V)"""
    prefix = ids.shape[1] - steps
    with torch.no_grad():
        out = hf(ids[:, :prefix], attention_mask=torch.ones_like(ids[:, :prefix]), use_cache=True)
        cache, logits = out.cache, []
        for t in range(prefix, ids.shape[1]):
            out = hf(ids[:, t:t + 1], attention_mask=torch.ones_like(ids[:, :t + 1]), cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def reference_decode_logits(model, ids, steps):
    """Our reference the export's way: prefill, then one token per call, the cache tensors carried."""
    prefix = ids.shape[1] - steps
    with torch.no_grad():
        _, *state = model(ids[:, :prefix], torch.ones_like(ids[:, :prefix]), *model.zero_state(ids.shape[0]))
        logits = []
        for t in range(prefix, ids.shape[1]):
            step, *state = model(ids[:, t:t + 1], torch.ones_like(ids[:, :t + 1]), *state)
            logits.append(step[:, -1])
    return torch.stack(logits, 1)


def rel_error(got, ref) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("variant", ["rms-norm-off", "no-head-dim"])
def test_reference_matches_transformers(tmp_path, monkeypatch, variant):
    """Prefill logits at the exports' lengths, and decode steps: transformers' step is another code
    path (with mamba_rms_norm off it applies the silu gate inside its state update)."""
    if variant == "rms-norm-off":
        ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "falcon_h1", mamba_rms_norm=False)
    else:  # head_dim from hidden / heads = 16; d_inner from mamba_expand · hidden = 128 = 8 heads of 16
        defaults = {k: v for k, v in tiny.TINY_FALCON_H1.items() if k != "head_dim"}
        monkeypatch.setitem(tiny.HYBRID_DEFAULTS, "falcon_h1", defaults)
        ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "falcon_h1", mamba_d_ssm=None)
        assert "head_dim" not in json.loads((ckpt / "config.json").read_text())
    ours = load_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    if variant == "no-head-dim":
        assert ours.cfg.attention.head_dim == 16 and ours.cfg.mamba.intermediate_size == 128
        assert hf.model.layers[0].self_attn.head_dim == 16
    else:
        assert not hasattr(ours.model.layers[0].mamba, "norm")
    for seqlen in (1, 7, 64, 100):
        ids = torch.from_numpy(np.random.default_rng(seqlen).integers(0, 256, (2, seqlen)))
        with torch.no_grad():
            got = ours(ids, torch.ones_like(ids), *ours.zero_state(2))[0]
            ref = hf(ids, attention_mask=torch.ones_like(ids)).logits
        rel = rel_error(got, ref)
        assert rel < LOGITS_RTOL, f"logits rel error {rel:.2e} at seqlen {seqlen}"  # the exports' budget
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 12)))
    rel = rel_error(reference_decode_logits(ours, ids, 6), hf_decode_logits(hf, ids, 6))
    assert rel < LOGITS_RTOL, f"decode logits rel error {rel:.2e}"


def test_every_branch_moves_the_tokens(tmp_path):
    """The fixtures are strong enough to catch a wrong branch: zeroing any layer's Mamba, attention or
    MLP output changes the predicted tokens (argmax at each of 32 positions, two sequences), so none
    of them is drowned out by the others."""
    model = load_model(make_tiny_checkpoint(tmp_path / "ckpt", "falcon_h1", **MODELS["tied"]))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 32)))

    def tokens():
        with torch.no_grad():
            return model(ids, torch.ones_like(ids), *model.zero_state(2))[0].argmax(-1)

    base = tokens()
    for i, layer in enumerate(model.model.layers):
        for part in ("mamba.out_proj", "self_attn.o_proj", "feed_forward.down_proj"):
            weight = layer.get_submodule(part).weight
            kept = weight.detach().clone()
            with torch.no_grad():
                weight.zero_()
            changed = int((tokens() != base).sum())
            with torch.no_grad():
                weight.copy_(kept)
            assert changed > 3, f"zeroing layer {i} {part} changes only {changed} of 64 tokens"


def test_config_mistakes_are_refused(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "falcon_h1", num_hidden_layers=1)
    path = ckpt / "config.json"
    good = json.loads(path.read_text())
    for change, message in (
            ({"ssm_multipliers": [1.0, 2.0]}, r"field 'ssm_multipliers': expected a list of 5 numbers, got \[1.0, 2.0\]"),
            ({"mamba_d_head": 16}, r"fields mamba_d_head \* mamba_n_heads: expected mamba_d_ssm = 96, got 16 \* 8"),
            # any activation ONNX computes exactly is read (gelu: tests/test_tester_configs.py)
            ({"hidden_act": "mish"}, r"field 'hidden_act': expected one of \[.*'gelu'.*\], got 'mish'")):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ScanExportError, match=message):
            load_model(ckpt)
