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

from .hybrid_checks import (LOGITS_RTOL, PROMPTS, assert_logits_match,  # noqa: E402
                            assert_prefill_then_decode_equals_one_prefill, assert_ragged_equals_singles, hf_greedy)


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
    ours = generate(model, PROMPTS, 32)
    for prompt, got in zip(PROMPTS, ours):
        cached, full = hf_greedy(hf, prompt, 32)
        # The full forward is the referee: transformers' cached decode runs another code path
        # (its recurrent step) that could round a near-tie the other way.
        assert got == full
    assert len({tuple(t) for t in ours}) == 3 and all(len(set(t)) > 4 for t in ours)  # not a degenerate model


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
