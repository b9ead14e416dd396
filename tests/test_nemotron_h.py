"""Nemotron-H (issue 11): exports against transformers' NemotronHForCausalLM on tiny random checkpoints
(saved by transformers itself: `backbone.` names, each expert's matrices apart).

Variants (three exports, ~30 s each on 2 idle cores):
  moe: Mamba-2 / attention / ReLU² MLP / MoE ("M*-E"): NoPE GQA 4:2, n_groups 2, 8 experts in 2 groups
       (top 2 within the best group), a perturbed e_score_correction_bias, routed_scaling_factor 2.5,
       shared experts
  mlp: attention first, then Mamba-2, then an MLP; multi-head attention (kv = heads), n_groups 1,
       chunk_size 8, time_step_limit (0.05, inf) so that the dt clamp moves the logits by more than the
       logits tolerance (measured 1.5e-4 relative at 0.02): dropping the clamp would fail the logits test
  latent: moe's layers with moe_latent_size 24 (fc1/fc2_latent_proj around the routed experts)
  tester: transformers 5.25's own NemotronHModelTester config (its numbers, copied), logits only

The referee is transformers >= 5.25: its mixer clamps dt to the checkpoint's time_step_limit, as
NVIDIA's Nemotron-H code and mamba_ssm's Mamba2 do, and so does our export. transformers <= 5.24
clamped to (time_step_min, inf) instead (an init-time bound); against those versions the SSM state
differs by ~3.5e-3 relative (and the tester config's logits by up to 0.36), so the module skips there
with that reason rather than judging by the wrong semantics (docs/versions.md).
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Nemotron-H tests compare against transformers")
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 25):
    pytest.skip(f"transformers {transformers.__version__} clamps Nemotron-H's dt to time_step_min, not the "
                "checkpoint's time_step_limit (fixed in 5.25); the referee needs >= 5.25", allow_module_level=True)

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.reference.models.families.nemotron_h import config_from_hf  # noqa: E402
from scan_export.onnx.model_export import DESCRIPTION_FILE, export_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402
from scan_export.verify import verify_export  # noqa: E402

from .hybrid_checks import PROMPTS, assert_logits_match  # noqa: E402

MODELS = {
    "moe": {},  # tiny.TINY_NEMOTRON_H
    "mlp": dict(layers_block_type=["full_attention", "linear_attention", "mlp"], num_key_value_heads=4, n_groups=1,
                chunk_size=8, time_step_limit=[0.05, float("inf")]),
    # Nemotron-3's latent MoE: the routed experts run on a 24-wide projection of the 64-wide hidden
    "latent": dict(moe_latent_size=24),
}
# transformers 5.25's NemotronHModelTester.get_config (tests/models/nemotron_h), numbers copied
TESTER = dict(vocab_size=99, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              layers_block_type=["linear_attention", "moe", "linear_attention", "full_attention", "moe"],
              intermediate_size=40, moe_intermediate_size=40, moe_shared_expert_intermediate_size=40,
              mlp_hidden_act="relu2", mamba_hidden_act="silu", max_position_embeddings=512, ssm_state_size=16,
              mamba_num_heads=8, n_groups=8, mamba_head_dim=16, conv_kernel=4, expand=2, chunk_size=64,
              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, initializer_range=0.02)
# fp32 export vs transformers fp32: same algebra, other kernels and summation orders; measured
# ≤ 1.4e-6 on these models. 1e-4 is the budget.


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / "ckpt", "nemotron_h", **MODELS[request.param])
    out = export_model(ckpt, root / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    return ckpt, out, hf, ExportedModel(out)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 100])
def test_logits_match_transformers(exported, seqlen):
    _, _, hf, model = exported
    assert_logits_match(hf, model, seqlen)


def test_tester_config_logits_match_transformers(tmp_path):
    """transformers' own model-tester config (n_groups 8, chunk_size 64, five layers with two MoE)
    exports within budget at the issue's lengths, 7 and 33. Measured: ≤ 8.0e-7. (On this config, with
    these weights, transformers <= 5.24's time_step_min clamp moves the logits by only 1.2e-5; the
    clamp semantics are pinned by the `mlp` variant and by verify's SSM state on `moe`.)"""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "nemotron_h", defaults=False, **TESTER)  # sharpened weights
    out = export_model(ckpt, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    model = ExportedModel(out)
    for seqlen in (7, 33):
        assert_logits_match(hf, model, seqlen)


def test_both_layer_type_spellings_read_alike():
    """transformers 5.25 saves layers_block_type as linear_attention / full_attention; 5.24 and the
    released checkpoints' configs say mamba / attention (or the M*-E pattern). All read alike."""
    legacy = {"linear_attention": "mamba", "full_attention": "attention"}
    current = dict(TESTER, num_hidden_layers=5)
    spellings = [current, dict(current, layers_block_type=[legacy.get(t, t) for t in TESTER["layers_block_type"]]),
                 dict({k: v for k, v in current.items() if k != "layers_block_type"}, hybrid_override_pattern="MEM*E")]
    configs = [config_from_hf(raw) for raw in spellings]
    assert all(c == configs[0] for c in configs)
    assert configs[0].mixers == ("mamba", "moe", "mamba", "attention", "moe")


def full_forward_choices(hf, prompt, tokens):
    """transformers' greedy choice after prompt + tokens[:t] for each t, from one full forward (no
    cache): what its full forward recomputed per token picks, given the same prefix."""
    with torch.no_grad():
        return hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].argmax(-1).tolist()


def test_greedy_tokens_match_transformers(exported):
    """transformers' one-token decode step skips the dt clamp that its chunked path (its full
    forward) applies; our graph clamps everywhere. So the referee is its full forward, and its
    cached generate() as well wherever that agrees with its own full forward (on these models it
    does, for all 32 tokens: checked below)."""
    _, _, hf, model = exported
    ours = generate(model, PROMPTS, 32)
    for prompt, got in zip(PROMPTS, ours):
        assert full_forward_choices(hf, prompt, got) == got
        ids = torch.tensor([prompt])
        with torch.no_grad():
            cached = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        cached = cached[0, len(prompt):].tolist()
        if cached != got:  # only acceptable where transformers' decode departs from its own full forward
            assert full_forward_choices(hf, prompt, cached) != cached, "transformers agrees with itself, not with us"
    assert len({tuple(t) for t in ours}) == 3 and all(len(set(t)) > 4 for t in ours)  # not a degenerate model


def test_ragged_batch_equals_single_prompts(exported):
    _, _, _, model = exported
    assert generate(model, PROMPTS, 32) == [generate(model, [p], 32)[0] for p in PROMPTS]


def test_verify_passes(exported):
    ckpt, out, _, model = exported
    report = verify_export(out, ckpt, n_tokens=8, n_prompts=1)
    assert report.passed, report.format()
    assert len(report.states) == 4 and len(report.logits) == 4  # one Mamba-2 and one attention layer, 2 tensors each


def test_description_is_the_io_contract(exported):
    """MLP and MoE layers carry no state: no inputs, outputs or state entries, and 'ffn' in layer_kinds."""
    _, out, _, model = exported
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    graph = onnx.load(str(out / desc["model_file"]), load_external_data=False).graph
    assert [i["name"] for i in desc["inputs"]] == [i.name for i in graph.input]
    assert [o["name"] for o in desc["outputs"]] == [o.name for o in graph.output]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    kinds = desc["layer_kinds"]
    assert desc["model_type"] == "nemotron_h" and desc["num_layers"] == len(kinds)
    assert [e["layer"] for e in desc["state"]] == [i for i, k in enumerate(kinds) if k != "ffn"]
    for entry in desc["state"]:
        i = entry["layer"]
        assert entry["kind"] == kinds[i]
        if entry["kind"] == "attention":
            assert dims[f"past_key_values.{i}.key"] == ["batch", entry["key"]["shape"][1], "past_seqlen", 16]
            assert dims[f"present.{i}.value"][2] == "total_seqlen"
        else:
            assert entry["kind"] == "mamba2" and dims[f"past.{i}.ssm_state"][1:] == list(entry["ssm_state"]["shape"][1:])
    assert desc["attention"]["rope"] is None  # NoPE
    ffn_layers = [i for i, k in enumerate(kinds) if k == "ffn"]
    assert not any(name.startswith((f"past.{i}.", f"past_key_values.{i}.")) for i in ffn_layers for name in dims)
    moe = "moe" in json.loads((exported[0] / "config.json").read_text())["layers_block_type"]
    assert desc["experts"] == ({"num_experts": 8, "experts_per_token": 2} if moe else None)


def test_moe_gather_and_loop_forms_agree(exported):
    """One token (2 pairs ≤ 8 experts) runs the gather form, five tokens (10 pairs) the Loop."""
    _, _, _, model = exported
    if not model.description["experts"]:
        pytest.skip("this variant has no MoE")
    ids = np.random.default_rng(5).integers(0, model.vocab_size, (5, 1))
    loop, _ = model.forward(ids, model.zero_state(5))
    gather = np.concatenate([model.forward(ids[r:r + 1], model.zero_state(1))[0] for r in range(5)])
    # the same products summed in another order: rounding only
    np.testing.assert_allclose(gather, loop, rtol=0, atol=1e-5 * np.abs(loop).max())


def test_stacked_and_per_expert_checkpoints_load_alike(exported, tmp_path):
    """transformers' in-memory names (model.*, experts stacked) load to the same model as the saved
    checkpoint's (backbone.*, one tensor per expert)."""
    from safetensors.torch import save_file

    from scan_export.reference.models import load_model

    ckpt, _, hf, _ = exported
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    a, b = load_model(ckpt), load_model(tmp_path)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def _config_error(ckpt, tmp_path, **changes):
    from scan_export.reference.models import load_model

    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScanExportError) as e:
        load_model(tmp_path)  # config.json is read (and refused) before any weight
    return str(e.value)


def test_legacy_pattern_and_refusals(exported, tmp_path):
    from scan_export.reference.models.families.nemotron_h import config_from_hf

    ckpt = exported[0]
    raw = json.loads((ckpt / "config.json").read_text())
    legacy = {k: v for k, v in raw.items() if k != "layers_block_type"} | {"hybrid_override_pattern": "M*-E"}
    cfg = config_from_hf(legacy)
    # layer_types are contract kinds (scan_export.json's names): the Mamba layers are Mamba-2 mixers
    assert cfg.mixers == ("mamba", "attention", "mlp", "moe") and cfg.layer_types == ("mamba2", "attention", "ffn", "ffn")
    assert config_from_hf(raw | {"layers_block_type": ["mamba", "attention"]}).mixers == ("mamba", "attention")
    msg = _config_error(ckpt, tmp_path, layers_block_type=["linear_attention", "sliding_attention"])
    assert msg.endswith("field 'layers_block_type': layer 1 is 'sliding_attention'; supported values are "
                        "['attention', 'full_attention', 'linear_attention', 'mamba', 'mlp', 'moe']")
    msg = _config_error(ckpt, tmp_path, layers_block_type=None, hybrid_override_pattern="M*X")
    assert msg.endswith("field 'hybrid_override_pattern': characters ['X'] are not layer types; supported characters "
                        "are ['*', '-', 'E', 'M']")
    msg = _config_error(ckpt, tmp_path, moe_latent_size=0)
    assert msg.endswith("field 'moe_latent_size': expected null or a positive integer, got 0")
    msg = _config_error(ckpt, tmp_path, mlp_hidden_act="silu")
    assert msg.endswith("field 'mlp_hidden_act': expected 'relu2', got 'silu'")


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_moe_lowering_matches_the_eager_op(activation, dtype):
    """The lowered MoeExperts alone (no model export), both forms, against reference/moe_op.py. In
    float16 the Loop form sums in float32 (onnxruntime's CPU ScatterND has no float16 'add')."""
    from onnx import TensorProto, helper

    from scan_export.onnx.lowering.graph_builder import GraphBuilder, value_info
    from scan_export.onnx.lowering.moe import emit_moe_experts
    from scan_export.reference.moe_op import moe_experts_eager
    from scan_export.runtime.session import make_session

    E, H, I, k = 4, 8, 6, 2
    rng = np.random.default_rng(0)
    up_rows = 2 * I if activation in ("swiglu", "geglu") else I
    weights = {"gate_up": rng.normal(size=(E, up_rows, H)).astype(dtype), "down": rng.normal(size=(E, H, I)).astype(dtype)}
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    gb = GraphBuilder("moe")
    out = emit_moe_experts(gb, "x", "idx", "w", "gate_up", "down", elem_type=elem, activation=activation)
    gb.nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(gb.nodes, "moe", [value_info("x", elem), value_info("idx", TensorProto.INT64), value_info("w", elem)],
                              [value_info("out", elem)], [helper.make_tensor(n, elem, v.shape, v.tobytes(), raw=True)
                                                          for n, v in weights.items()])
    session = make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(), "cpu")
    for n in (1, 5):  # 2 pairs ≤ 4 experts: the gather form; 10 pairs: the Loop
        x = rng.normal(size=(n, H)).astype(dtype)
        idx = np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
        w = rng.uniform(size=(n, k)).astype(dtype)
        (got,) = session.run(None, {"x": x, "idx": idx, "w": w})
        want = moe_experts_eager(*(torch.from_numpy(a).double() for a in (x,)), torch.from_numpy(idx),
                                 *(torch.from_numpy(a).double() for a in (w, weights["gate_up"], weights["down"])),
                                 activation).numpy()
        # float32: rounding of a few products; float16: its 2^-11 relative step on each product and sum
        tol = 1e-5 if dtype == np.float32 else 4e-3
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
