"""Hybrid models (Mamba-2 + attention, issue 11): bamba and granitemoehybrid exports against
transformers on tiny random checkpoints, with KV caches, the attention mask and ragged batches.

Variants (three exports, to keep CI time modest; each export takes ~1 min on 2 cores):
  bamba:     attention first then Mamba-2, n_groups 2, GQA 4:2, partial RoPE, tied embeddings
  granite:   Mamba-2 / attention / Mamba-2, MoE 4 experts top-2 + shared MLP, RoPE, GQA 4:2, every
             Granite multiplier, untied embeddings
  granite-dense: no MoE, no position embedding (NoPE), multi-head attention (kv = heads), attention
             last, n_groups 1, tied embeddings, logits_scaling and attention_multiplier only
"""

import json

import numpy as np
import onnx
import pytest

transformers = pytest.importorskip("transformers", reason="the hybrid tests compare against transformers")

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .hybrid_checks import (assert_greedy_tokens_match, PROMPTS, assert_logits_match, assert_prefill_then_decode_equals_one_prefill,  # noqa: E402
                            assert_ragged_equals_singles)
from .test_export_module import op_histogram  # noqa: E402

MODELS = {
    "bamba": ("bamba", dict(num_hidden_layers=3, attn_layer_indices=[0], mamba_n_groups=2, tie_word_embeddings=True)),
    "granite": ("granitemoehybrid", dict(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"])),
    "granite-dense": ("granitemoehybrid", dict(num_hidden_layers=3, layer_types=["mamba", "mamba", "attention"],
                                               num_local_experts=0, position_embedding_type=None,
                                               num_key_value_heads=4, tie_word_embeddings=True,
                                               # with tied embeddings ×12 the model only echoes its input
                                               embedding_multiplier=1.0, residual_multiplier=1.0)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    model_type, overrides = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / "ckpt", model_type, **overrides)
    out = export_model(ckpt, root / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    return ckpt, out, hf, ExportedModel(out)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    _, _, hf, model = exported
    assert_logits_match(hf, model, seqlen)


def test_greedy_tokens_match_transformers_generate(exported):
    _, _, hf, model = exported
    # transformers' cached decode and its full forward agree on these models (checked here), so
    # the referee is unambiguous.
    assert_greedy_tokens_match(hf, model)


def test_ragged_batch_equals_single_prompts(exported):
    """Groups of equal length are prefilled apart, their KV caches left-padded and masked when stacked."""
    _, _, _, model = exported
    assert_ragged_equals_singles(model)


def test_left_padded_cache_is_masked_out(exported):
    """A cache padded on the left with garbage (masked 0) gives the logits of the unpadded cache."""
    _, _, _, model = exported
    ids = np.random.default_rng(4).integers(0, model.vocab_size, (1, 9))
    _, state = model.forward(ids[:, :8], model.zero_state(1))
    want, _ = model.forward(ids[:, 8:], state)
    padded = []
    for s, axis in zip(state, model.seq_axes):
        if axis is None:
            padded.append(s)
        else:
            pad = list(s.shape)
            pad[axis] = 5
            fill = np.zeros(pad, s.dtype) if s.dtype == np.int64 else np.full(pad, 7.0, s.dtype)
            padded.append(np.concatenate([fill, s], axis=axis))
    got, new_state = model.forward(ids[:, 8:], padded)
    # The padded keys' probabilities are exp(finfo.min − max) = 0 exactly; only the softmax's
    # summation over a longer row can round differently.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert new_state[-1].tolist() == [[0] * 5 + [1] * 9]


def test_prefill_then_decode_equals_one_long_prefill(exported):
    _, _, _, model = exported
    assert_prefill_then_decode_equals_one_prefill(model)


def test_verify_passes(exported):
    ckpt, out, _, _ = exported
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()
    assert len(report.states) == 6 and len(report.logits) == 4  # two tensors per layer, three layers


def test_description_is_the_io_contract(exported):
    _, out, _, model = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    graph = onnx.load(str(out / desc["model_file"]), load_external_data=False).graph
    assert [i["name"] for i in desc["inputs"]] == [i.name for i in graph.input]
    assert [o["name"] for o in desc["outputs"]] == [o.name for o in graph.output]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    assert dims["attention_mask"] == ["batch", "total_seqlen"]
    for entry in desc["state"]:
        if entry["kind"] == "attention":
            i = entry["layer"]
            assert dims[f"past_key_values.{i}.key"] == ["batch", entry["key"]["shape"][1], "past_seqlen", entry["key"]["shape"][3]]
            assert dims[f"present.{i}.value"][2] == "total_seqlen" and entry["value"]["init"] == "empty"
        else:
            assert entry["kind"] == "mamba2" and entry["conv_state"]["init"] == entry["ssm_state"]["init"] == "zeros"
    assert desc["version"] == 4 and len(desc["state"]) == desc["num_layers"] == 3


def test_moe_gather_and_loop_forms_agree(exported):
    """The MoE lowering runs the gather form when N·k ≤ E (one token: 2 pairs ≤ 4 experts) and the
    Loop over experts otherwise (three tokens: 6 pairs). Each row must not depend on the others."""
    _, _, _, model = exported
    if not model.description["experts"]:
        pytest.skip("this variant has no MoE")
    ids = np.random.default_rng(5).integers(0, model.vocab_size, (3, 1))
    loop, _ = model.forward(ids, model.zero_state(3))
    gather = np.concatenate([model.forward(ids[r:r + 1], model.zero_state(1))[0] for r in range(3)])
    # The same products summed in another order (k slots vs expert order): rounding only.
    np.testing.assert_allclose(gather, loop, rtol=0, atol=1e-5 * np.abs(loop).max())


def test_unknown_layer_type_is_refused(tmp_path):
    from scan_export.reference.models import load_model

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "granitemoehybrid", num_hidden_layers=2,
                                layer_types=["mamba", "attention"])
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["layer_types"] = ["mamba", "sliding_attention"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScanExportError, match=r"field 'layer_types': layer 1 is 'sliding_attention'; supported "
                                              r"values are \['attention', 'full_attention', 'linear_attention', 'mamba'\]"):
        load_model(ckpt)
    cfg["layer_types"] = ["mamba", "attention"]
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    cfg["position_embedding_type"] = "rope"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScanExportError, match=r"field 'rope_parameters.rope_type': expected one of \['default', 'linear'\], got 'yarn'"):
        load_model(ckpt)


def test_node_count_does_not_depend_on_export_length(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "granitemoehybrid", num_hidden_layers=2,
                                layer_types=["attention", "mamba"])
    a = export_model(ckpt, tmp_path / "a", example_seqlen=4)
    b = export_model(ckpt, tmp_path / "b", example_seqlen=96)
    ha, hb = (op_histogram(onnx.load(str(p / "model.onnx"))) for p in (a, b))
    assert ha == hb
    assert ha["Loop"] == 1 + 2 and ha["If"] == 1 + 2  # the Mamba layer's SSD; each layer's MoE


def test_io_binding_decode_equals_plain(exported):
    """The bound decoder (the CUDA default) keeps KV caches on the device and lets onnxruntime grow
    them; on CPU it must give exactly the plain path's tokens and final state."""
    from scan_export.runtime.binding import BoundDecoder, PlainDecoder
    from scan_export.runtime.generate import prefill

    _, _, _, model = exported
    plain_logits, state = prefill(model, PROMPTS)
    plain, bound = PlainDecoder(model, state), BoundDecoder(model, state)
    tokens = plain_logits.argmax(-1)
    for _ in range(6):
        a, b = plain(tokens), bound(tokens)
        np.testing.assert_array_equal(a, b)  # same session, same inputs: bit-identical
        tokens = a.argmax(-1)
    for x, y in zip(plain.state, bound.state()):
        np.testing.assert_array_equal(x, y)
