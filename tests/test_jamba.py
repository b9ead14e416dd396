"""Jamba (issue 11): Mamba-1 layers (with Jamba's Δ/B/C norms) and attention layers without any
position encoding, SwiGLU MLPs or a softmax-then-top-k MoE (not renormalised), exported and compared
against transformers' JambaForCausalLM on tiny random checkpoints.

Exports (two, module-scoped):
  moe:   4 layers, Mamba-1 / attention / Mamba-1 / attention (attn period 2, offset 1), MoE with 4
         experts top-2 in layers 0 and 3 (expert period 3, offset 0: after a Mamba layer and after an
         attention layer), dense MLPs in 1 and 2, GQA 4:2, untied embeddings, mamba_dt_rank 8
  dense: 3 layers, attention first (attn period 3, offset 0), num_experts 1 (dense MLPs only),
         multi-head attention (kv = heads), tied embeddings, mamba_dt_rank "auto" (= 4)
Without an export (the torch reference, cheap): transformers' decode steps, a multi-token
continuation (judged by transformers' full forward: its slow Mamba-1 path ignores the cached ssm
state for chunks of more than one token: transformers 5.25 modeling_jamba.mamba_scan_forward), checkpoints with per-expert or stacked
expert tensors, the memory-lean loader's stacked source, refused configs.
"""

import json

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Jamba tests compare against transformers")

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.reference.models import load_hf_state_dict, load_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .test_falcon_h1 import hf_decode_logits, reference_decode_logits, rel_error  # noqa: E402
from .hybrid_checks import assert_greedy_tokens_match, LOGITS_RTOL, assert_logits_match, assert_ragged_equals_singles  # noqa: E402

MODELS = {
    "moe": dict(expert_layer_period=3, expert_layer_offset=0),
    "dense": dict(num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=0, num_experts=1,
                  num_key_value_heads=4, tie_word_embeddings=True, mamba_dt_rank="auto"),
}
KINDS = {"moe": ["mamba", "attention", "mamba", "attention"], "dense": ["attention", "mamba", "mamba"]}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / "ckpt", "jamba", **MODELS[request.param])
    out = export_model(ckpt, root / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    return request.param, ckpt, out, hf, ExportedModel(out)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    *_, hf, model = exported
    assert_logits_match(hf, model, seqlen)


def test_greedy_tokens_match_transformers_generate(exported):
    *_, hf, model = exported
    # generate() prefills with its full-sequence path and then decodes one token per call
    # (its state update, which does read the cached state), so it agrees with its own full
    # forward recomputed per token (checked here); the referee is unambiguous.
    assert_greedy_tokens_match(hf, model)


def test_ragged_batch_equals_single_prompts(exported):
    *_, model = exported
    assert_ragged_equals_singles(model)


def test_prefill_then_decode_equals_one_long_prefill(exported):
    """Single steps and a multi-token continuation from the carried state (transformers' slow path
    cannot do the latter: it restarts the scan from zeros) give the one long prefill's logits."""
    *_, model = exported
    ids = np.random.default_rng(1).integers(0, model.vocab_size, (2, 40))
    full, _ = model.forward(ids, model.zero_state(2))
    _, state = model.forward(ids[:, :24], model.zero_state(2))
    chunk, state = model.forward(ids[:, 24:30], state)
    steps = [chunk]
    for t in range(30, 40):
        logits, state = model.forward(ids[:, t:t + 1], state)
        steps.append(logits)
    # The same recurrence split differently: rounding only.
    np.testing.assert_allclose(np.concatenate(steps, 1), full[:, 24:], rtol=0, atol=1e-4 * np.abs(full).max())


def test_verify_passes(exported):
    name, ckpt, out, _, _ = exported
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()
    # two tensors per layer (conv, ssm or key, value), all judged against transformers' cache
    assert len(report.states) == 2 * len(KINDS[name]) and len(report.logits) == 4


def test_description_is_the_io_contract(exported):
    name, _, out, _, _ = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    graph = onnx.load(str(out / desc["model_file"]), load_external_data=False).graph
    assert [i["name"] for i in desc["inputs"]] == [i.name for i in graph.input]
    assert [o["name"] for o in desc["outputs"]] == [o.name for o in graph.output]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    assert desc["layer_kinds"] == KINDS[name]
    assert desc["attention"]["rope"] is None and desc["intermediate_size"] == 128
    assert desc["experts"] == ({"num_experts": 4, "experts_per_token": 2} if name == "moe" else None)
    assert desc["scan_form"] == "sequential"  # Mamba-1 scans: the Mamba-1 exports' option
    for entry in desc["state"]:
        i = entry["layer"]
        if entry["kind"] == "mamba":  # the Mamba-1 exports' layout: channels last
            assert dims[f"past.{i}.conv_state"] == ["batch", 3, 128]  # K−1, d_inner
            assert dims[f"present.{i}.ssm_state"] == ["batch", 8, 128]  # n, d_inner
            assert entry["conv_state"]["init"] == entry["ssm_state"]["init"] == "zeros"
            assert entry["ssm_state"]["dtype"] == "float32"
        else:
            kv = 2 if name == "moe" else 4
            assert dims[f"past_key_values.{i}.key"] == ["batch", kv, "past_seqlen", 16]
            assert dims[f"present.{i}.value"] == ["batch", kv, "total_seqlen", 16] and entry["value"]["init"] == "empty"
    assert desc["version"] == 4 and len(desc["state"]) == desc["num_layers"] == len(KINDS[name])


# ------------------------------------------------------------------------------------------------
# The torch reference alone (no export)


def test_reference_decode_and_continuation_match_transformers(tmp_path):
    """Decode steps (transformers' state update, another code path), and a multi-token continuation
    judged by transformers' full forward: transformers' own continuation restarts its scan from
    zeros (its torch selective scan, modeling_jamba.mamba_scan_forward, ignores the cached ssm state), ours carries it."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "jamba")
    ours = load_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 14)))
    rel = rel_error(reference_decode_logits(ours, ids, 6), hf_decode_logits(hf, ids, 6))
    assert rel < LOGITS_RTOL, f"decode logits rel error {rel:.2e}"
    with torch.no_grad():
        _, *state = ours(ids[:, :5], torch.ones_like(ids[:, :5]), *ours.zero_state(2))
        got = ours(ids[:, 5:], torch.ones_like(ids), *state)[0]
        ref = hf(ids, attention_mask=torch.ones_like(ids)).logits[:, 5:]
    rel = rel_error(got, ref)
    assert rel < LOGITS_RTOL, f"continuation logits rel error {rel:.2e}"


def test_experts_load_stacked_or_per_expert(tmp_path):
    """save_pretrained writes each expert's gate/up/down (transformers stacks them at load); a
    checkpoint holding the stacked tensors loads too, to the same model."""
    from safetensors.torch import save_file

    from scan_export.reference.models.loading import stack_rows, stacked_tensors

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "jamba")
    state = load_hf_state_dict(ckpt)
    assert "model.layers.1.feed_forward.experts.3.up_proj.weight" in state
    assert "model.layers.1.feed_forward.experts.gate_up_proj" not in state
    per_expert = load_model(ckpt)
    moe = per_expert.model.layers[1].feed_forward
    # gate rows first, then up, per expert (transformers' Concatenate(dim=1) after MergeModulelist)
    torch.testing.assert_close(moe.experts.gate_up_proj[2, 96:], state["model.layers.1.feed_forward.experts.2.up_proj.weight"],
                               rtol=0, atol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt))
    torch.testing.assert_close(moe.experts.gate_up_proj, hf.model.layers[1].feed_forward.experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(moe.experts.down_proj, hf.model.layers[1].feed_forward.experts.down_proj, rtol=0, atol=0)

    stacked = stacked_tensors(ckpt, state, stack_rows)
    (tmp_path / "ckpt2").mkdir()
    (tmp_path / "ckpt2" / "config.json").write_text((ckpt / "config.json").read_text())
    save_file({k: v for k, v in stacked.items() if ".experts." not in k or k.endswith("_proj")},
              str(tmp_path / "ckpt2" / "model.safetensors"))
    again = load_model(tmp_path / "ckpt2")
    for (k, a), (_, b) in zip(per_expert.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_lean_loader_streams_stacked_experts(tmp_path):
    """The memory-lean export's source for a stacked parameter reads any rows, converted, as the
    eager stack holds them."""
    from scan_export.onnx.lazy_checkpoint import StackedSource, checkpoint_tensors
    from scan_export.reference.models.loading import stack_rows, stacked_tensors

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "jamba")
    eager = stacked_tensors(ckpt, load_hf_state_dict(ckpt), stack_rows)
    lean = stacked_tensors(ckpt, checkpoint_tensors(ckpt), StackedSource)
    for name in ("model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.3.feed_forward.experts.down_proj"):
        assert isinstance(lean[name], StackedSource) and lean[name].shape == tuple(eager[name].shape)
        torch.testing.assert_close(lean[name].rows(1, 3), eager[name][1:3], rtol=0, atol=0)


def test_every_branch_moves_the_tokens(tmp_path):
    """The fixtures are strong enough to catch a wrong branch: zeroing any layer's mixer or
    feed-forward output (an MLP's down_proj, or every expert's), or tripling a Δ/B/C norm's weight,
    changes the predicted tokens (argmax at each of 32 positions, two sequences)."""
    model = load_model(make_tiny_checkpoint(tmp_path / "ckpt", "jamba", **MODELS["moe"]))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 32)))

    def tokens():
        with torch.no_grad():
            return model(ids, torch.ones_like(ids), *model.zero_state(2))[0].argmax(-1)

    base = tokens()
    for i, layer in enumerate(model.model.layers):
        mixer = "mamba.out_proj.weight" if hasattr(layer, "mamba") else "self_attn.o_proj.weight"
        ffn = "feed_forward.experts.down_proj" if hasattr(layer.feed_forward, "experts") else "feed_forward.down_proj.weight"
        norms = [f"mamba.{n}_layernorm.weight" for n in ("dt", "b", "c")] if hasattr(layer, "mamba") else []
        for part in (mixer, ffn, *norms):
            weight = layer.get_parameter(part)
            kept = weight.detach().clone()
            with torch.no_grad():
                weight.zero_() if "layernorm" not in part else weight.mul_(3.0)
            changed = int((tokens() != base).sum())
            with torch.no_grad():
                weight.copy_(kept)
            assert changed > 3, f"changing layer {i} {part} changes only {changed} of 64 tokens"


def test_router_is_not_renormalised(tmp_path):
    """Jamba's expert weights are the top-k softmax probabilities over all experts, summing to < 1."""
    model = load_model(make_tiny_checkpoint(tmp_path / "ckpt", "jamba"))
    router = model.model.layers[1].feed_forward.router
    weights, index = router(torch.randn(5, 64))
    assert index.shape == (5, 2) and (weights.sum(-1) < 1 - 1e-3).all()


def test_config_mistakes_are_refused(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "jamba", num_hidden_layers=2)
    path = ckpt / "config.json"
    good = json.loads(path.read_text())
    for change, message in (
            ({"attn_layer_offset": 2}, r"field 'attn_layer_offset': expected an integer in \[0, 2\) \(attn_layer_period\), got 2"),
            ({"expert_layer_period": 0}, r"field 'expert_layer_period': expected a positive integer, got 0"),
            ({"num_experts_per_tok": 5}, r"field 'num_experts_per_tok': expected 1..4 \(num_experts\), got 5"),
            # The schema pass (config.check_schema) meets this one first.
            ({"mamba_dt_rank": "full"}, r"field 'mamba_dt_rank': expected an integer in \[1, 131072\] or \"auto\", got \"full\""),
            # the mixer and MLPs take any exact activation, the experts silu or gelu (tests/test_tester_configs.py)
            ({"hidden_act": "relu"}, r"field 'hidden_act': the experts take one of \['gelu', 'gelu_python', 'silu', 'swish'\], got 'relu'")):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ScanExportError, match=message):
            load_model(ckpt)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "num_experts"} | {"num_local_experts": 2}))
    with pytest.raises(ScanExportError, match=r"feed_forward.router.weight expected shape \(2, 64\) .*got \(4, 64\)"):
        load_model(ckpt)  # num_local_experts is read (the alias): the checkpoint holds 4
