"""Zamba2 (issue 11): Mamba-2 layers and hybrid layers that run a SHARED transformer block (with
per-layer adapters) on [hidden | embeddings], exported and compared against transformers'
Zamba2ForCausalLM on tiny random checkpoints (tiny.TINY_ZAMBA2: 5 layers, hybrid at 1, 2, 4).

Exports (two, module-scoped), both with tied embeddings (transformers ties the shared blocks only then):
  shared2: 2 shared blocks (layers 1 and 4 run block 0, layer 2 block 1), q/k/v adapters and the
           MLP adapters, multi-head attention (kv = heads: the k/v adapters are 2·hidden wide), RoPE
  gqa:     1 shared block run by all three hybrid layers (the first hybrid layer is layer 0), no
           attention adapters (the MLP adapters are always there in transformers 5.24), GQA 4:2,
           no RoPE (use_mem_rope false), add_bias_linear (Mamba in/out_proj and MLP biases)
Without an export: untied embeddings (a block copy per hybrid layer, as transformers runs it),
every branch moving the tokens, config mistakes.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

transformers = pytest.importorskip("transformers", reason="the Zamba2 tests compare against transformers")

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.reference.models import load_hf_state_dict, load_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .test_falcon_h1 import hf_decode_logits, reference_decode_logits, rel_error  # noqa: E402
from .hybrid_checks import LOGITS_RTOL, PROMPTS, assert_logits_match, assert_ragged_equals_singles, hf_greedy  # noqa: E402

KINDS = ["mamba2", "mamba2+attention", "mamba2+attention", "mamba2", "mamba2+attention"]
MODELS = {
    "shared2": dict(),
    "gqa": dict(layers_block_type=["hybrid", "linear_attention", "hybrid", "linear_attention", "hybrid"],
                num_mem_blocks=1, use_shared_attention_adapter=False, num_key_value_heads=2, use_mem_rope=False,
                add_bias_linear=True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / "ckpt", "zamba2", **MODELS[request.param])
    out = export_model(ckpt, root / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    return request.param, ckpt, out, hf, ExportedModel(out)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    _, _, _, hf, model = exported
    assert_logits_match(hf, model, seqlen)


def test_greedy_tokens_match_transformers(exported):
    _, _, _, hf, model = exported
    ours = generate(model, PROMPTS, 32)
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            cached = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        if got != cached[0, len(prompt):].tolist():
            # transformers' cached decode step (mamba2_selective_state_update) skips the dt clamp to
            # time_step_min that its chunked path applies, so it may part from its own full forward
            # where two logits nearly tie. Our export clamps at every length, as the full forward
            # does: then the referee is the full forward recomputed per token (slow, so only here).
            assert got == hf_greedy(hf, prompt, 32)[1]
    assert len({tuple(t) for t in ours}) == 3 and all(len(set(t)) > 4 for t in ours)  # not a degenerate model


def test_ragged_batch_equals_single_prompts(exported):
    model = exported[-1]
    assert_ragged_equals_singles(model)


def test_verify_passes(exported):
    _, ckpt, out, _, _ = exported
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()
    # conv and ssm of 5 layers, key and value of the 3 hybrid ones, all judged against transformers' cache
    assert len(report.states) == 16 and len(report.logits) == 4


def test_description_is_the_io_contract(exported):
    name, _, out, _, _ = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    graph = onnx.load(str(out / desc["model_file"]), load_external_data=False).graph
    assert [i["name"] for i in desc["inputs"]] == [i.name for i in graph.input]
    assert [o["name"] for o in desc["outputs"]] == [o.name for o in graph.output]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    kinds = [{"linear_attention": "mamba2", "hybrid": "mamba2+attention"}[t]
             for t in MODELS[name].get("layers_block_type", [])] or KINDS
    assert desc["layer_kinds"] == kinds and [e["kind"] for e in desc["state"]] == kinds
    kv = 2 if name == "gqa" else 4
    # the shared attention is 2·hidden = 128 wide: head_dim 128 / 4 heads
    assert desc["attention"]["head_dim"] == 32 and desc["attention"]["num_kv_heads"] == kv
    assert (desc["attention"]["rope"] is None) == (name == "gqa")
    names = []
    for entry in desc["state"]:
        i = entry["layer"]
        assert dims[f"past.{i}.conv_state"] == ["batch", 3, 128 + 2 * 16]  # K−1, d_inner + 2·groups·n
        assert dims[f"past.{i}.ssm_state"] == ["batch", 8, 16, 16]
        names += [f"past.{i}.conv_state", f"past.{i}.ssm_state"]
        if entry["kind"] == "mamba2+attention":  # each hybrid layer its own KV cache, the block shared or not
            assert dims[f"past_key_values.{i}.key"] == ["batch", kv, "past_seqlen", 32]
            assert dims[f"present.{i}.value"] == ["batch", kv, "total_seqlen", 32] and entry["value"]["init"] == "empty"
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        else:
            assert "key" not in entry
    assert [i.name for i in graph.input][2:-1] == names
    assert desc["num_layers"] == len(desc["state"]) == 5


def test_each_shared_tensor_is_stored_once(exported):
    """save_pretrained writes a shared block once (under the first hybrid layers that run it); the
    export must too, though torch.export names it once per hybrid layer that uses it. Every tensor
    the optimizer cannot fold (> 8192 elements: q/k/v_proj, gate_up_proj) must appear in exactly one
    initializer (as written, or transposed), and the file must hold no other copy."""
    name, ckpt, out, _, _ = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    proto = onnx.load(str(out / desc["model_file"]))
    inits = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    state = load_hf_state_dict(ckpt)
    shared = {k: v.numpy() for k, v in state.items() if "shared_transformer" in k and v.numel() > 8192}
    # the checkpoint holds each block once, under the first hybrid layer(s) that run it
    owners = {"shared2": {"model.layers.1", "model.layers.2"}, "gqa": {"model.layers.0"}}[name]
    assert {k.split(".shared_transformer")[0] for k in shared} == owners
    assert len(shared) == len(owners) * (4 if name == "shared2" else 2)  # q, k, v (GQA: k, v are 8192), gate_up
    for k, w in shared.items():
        copies = sum(a.shape in (w.shape, w.T.shape) and (np.array_equal(a, w) or np.array_equal(a, w.T))
                     for a in inits)
        assert copies == 1, f"{k}: {copies} copies in the export (3 hybrid layers run {len(owners)} block(s))"
    big = sum(a.size for a in inits if a.size > 8192)
    unique = sum(v.numel() for v in state.values() if v.numel() > 8192)
    assert big == unique  # tied lm_head included: every big checkpoint tensor once, nothing twice


# ------------------------------------------------------------------------------------------------
# The torch reference alone (no export)


@pytest.mark.parametrize("variant", ["untied", "gqa-decode"])
def test_reference_matches_transformers(tmp_path, variant):
    """untied: transformers 5.24 ties Zamba2's shared blocks only with tied embeddings, so an untied
    checkpoint has (and runs) a block copy per hybrid layer; we read and run the same.
    Also decode steps against transformers' cached decode: it skips the dt clamp there; on these
    fixtures ~10% of dt fall under time_step_min, but clamping them moves the logits only ~1.6e-5
    (test_dt_clamp_as_in_transformers_chunked_path makes it bite)."""
    overrides = dict(tie_word_embeddings=False) if variant == "untied" else MODELS["gqa"]
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "zamba2", **overrides)
    ours = load_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    layers = ours.model.layers
    if variant == "untied":
        assert layers[1].shared_transformer is not layers[4].shared_transformer
        assert "model.layers.4.shared_transformer.self_attn.q_proj.weight" in dict(ours.named_parameters())
    else:
        assert layers[0].shared_transformer is layers[2].shared_transformer is layers[4].shared_transformer
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


def test_dt_clamp_as_in_transformers_chunked_path(tmp_path):
    """time_step_min raised to 0.1 in config.json (the weights keep their init, dt_bias from
    softplus⁻¹ of 0.001-0.1): the clamp now bites hard. We match transformers' full forward (its
    chunked path, which clamps) within the budget, and the same model without the clamp does not,
    by far: so the clamp is there, at transformers' bound."""
    import dataclasses

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "zamba2")
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "time_step_min": 0.1}))
    ours = load_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = torch.from_numpy(np.random.default_rng(64).integers(0, 256, (2, 64)))
    with torch.no_grad():
        ref = hf(ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, torch.ones_like(ids), *ours.zero_state(2))[0]
        for layer in ours.model.layers:
            mixer = layer.mamba if hasattr(layer, "mamba") else layer.mamba_decoder.mamba
            assert mixer.cfg.time_step_limit == (0.1, float("inf"))
            mixer.cfg = dataclasses.replace(mixer.cfg, time_step_limit=(0.0, float("inf")))
        unclamped = ours(ids, torch.ones_like(ids), *ours.zero_state(2))[0]
    assert rel_error(got, ref) < LOGITS_RTOL
    # measured 2.3e-3 (the clamped model: ~3e-6): the Mamba branches are small next to the residual
    assert rel_error(unclamped, ref) > 10 * LOGITS_RTOL


def test_every_branch_moves_the_tokens(tmp_path):
    """The fixture is strong enough to catch a wrong branch: zeroing any layer's Mamba output, any
    hybrid layer's linear, a shared block's attention or MLP output, or one hybrid layer's own
    adapter (q and gate_up) changes the predicted tokens (argmax at 32 positions, two sequences)."""
    model = load_model(make_tiny_checkpoint(tmp_path / "ckpt", "zamba2"))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 32)))

    def tokens():
        with torch.no_grad():
            return model(ids, torch.ones_like(ids), *model.zero_state(2))[0].argmax(-1)

    block = "shared_transformer"
    parts = [f"model.layers.{i}.mamba.out_proj" for i in (0, 3)]
    parts += [f"model.layers.{i}.{p}" for i in (1, 2, 4) for p in ("mamba_decoder.mamba.out_proj", "linear")]
    parts += [f"model.layers.{i}.{block}.{p}" for i in (1, 2) for p in ("self_attn.o_proj", "feed_forward.down_proj")]
    parts += [f"model.layers.1.{block}.{p}_adapter_list.{j}.1" for j in (0, 2) for p in ("self_attn.linear_q",
                                                                                        "feed_forward.gate_up_proj")]
    base = tokens()
    for part in parts:
        weight = model.get_submodule(part).weight
        kept = weight.detach().clone()
        with torch.no_grad():
            weight.zero_()
        changed = int((tokens() != base).sum())
        with torch.no_grad():
            weight.copy_(kept)
        assert changed > 3, f"zeroing {part} changes only {changed} of 64 tokens"


def test_config_mistakes_are_refused(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "zamba2")
    path = ckpt / "config.json"
    good = json.loads(path.read_text())
    for change, message in (
            ({"hidden_act": "relu"}, r"field 'hidden_act': expected one of \['gelu'\], got 'relu'"),
            ({"layers_block_type": ["linear_attention", "full_attention", "hybrid", "hybrid", "hybrid"]},
             r"field 'layers_block_type': layer 1 is 'full_attention'; supported values are "
             r"\['hybrid', 'linear_attention', 'mamba'\]"),
            ({"layers_block_type": ["hybrid"]}, r"field 'layers_block_type': expected a list of num_hidden_layers = 5"),
            ({"num_key_value_heads": 2}, r"field 'num_key_value_heads': expected num_attention_heads = 4 with "
                                         r"use_shared_attention_adapter"),
            ({"n_mamba_heads": 7}, r"field 'n_mamba_heads': expected a divisor of mamba_expand \* hidden_size = 128, got 7"),
            ({"use_mem_rope": True, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
             r"field 'rope_parameters.rope_type': expected one of \['default', 'linear'\], got 'yarn'")):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ScanExportError, match=message):
            load_model(ckpt)
