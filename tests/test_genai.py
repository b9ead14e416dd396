"""onnxruntime-genai (>= 0.18) runs `--target genai` exports as they are and picks the same greedy
tokens as our runtime (issue 12: onnxruntime-genai as a target)."""

import json
import shutil
import sys

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("transformers", reason="the genai tests build tiny checkpoints with transformers")

from scan_export.cli import main  # noqa: E402
from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.genai_config import genai_config  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.runtime.genai import GENAI_CONFIG_FILE, GenaiModel, generate_genai, import_genai  # noqa: E402
from scan_export.runtime.generate import ExportedModel, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

from .test_deploy import CHROMIUM, DEPLOY, needs_chromium, needs_node, run_node, serve  # noqa: E402

try:
    import onnxruntime_genai  # noqa: F401

    GENAI_MISSING = None
except ImportError as e:
    GENAI_MISSING = f"onnxruntime_genai cannot be imported ({e}): pip install 'onnxruntime-genai>=0.18'"
needs_genai = pytest.mark.skipif(GENAI_MISSING is not None, reason=GENAI_MISSING or "")

PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 42, 42, 9]]  # one length: genai pads ragged batches into the state
N_TOKENS = 20
# The tiny checkpoints have no special tokens; give them some, as real ones have (mamba-130m: eos =
# pad = 0). Token 255 never comes up in these 20-token runs (asserted), so nothing stops early.
TOKENS = {"eos_token_id": 255, "pad_token_id": 255, "bos_token_id": 1}


def with_special_tokens(ckpt, tokens=TOKENS):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **tokens}))
    (ckpt / "generation_config.json").write_text(json.dumps({**tokens, "do_sample": False, "max_length": 64,
                                                             "num_beams": 4}))
    return ckpt


@pytest.fixture(scope="module", params=["mamba", "mamba2", "falcon_mamba"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = with_special_tokens(make_tiny_checkpoint(root / "ckpt", request.param))
    return export_model(ckpt, root / "export", target="genai")


def test_genai_config_names_our_io_and_the_checkpoint_tokens(exported):
    config = json.loads((exported / GENAI_CONFIG_FILE).read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "decoder" and decoder["filename"] == "model.onnx"
    assert (model["eos_token_id"], model["pad_token_id"], model["bos_token_id"]) == (255, 255, 1)
    assert decoder["inputs"]["past_recurrent_names"] % 1 == "past.1.ssm_state"
    assert decoder["outputs"]["present_conv_names"] % 0 == "present.0.conv_state"
    # generation_config's search defaults, except beams: genai does not reorder recurrent state.
    assert config["search"] == {"do_sample": False, "max_length": 64, "num_beams": 1,
                                "past_present_share_buffer": False}


def test_genai_config_token_fallbacks(tmp_path):
    desc = {"vocab_size": 10, "num_layers": 1, "hidden_size": 4}
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [3, 4], "bos_token_id": None}))
    model = genai_config(desc, "model.onnx", tmp_path)["model"]
    assert model["eos_token_id"] == [3, 4] and model["pad_token_id"] == 3 and "bos_token_id" not in model
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ScanExportError, match="generation_config.json is not valid JSON"):
        genai_config(desc, "model.onnx", tmp_path)


def test_logits_to_keep_has_a_default_of_all_positions(exported):
    """genai never feeds logits_to_keep; our runtime still does (1 for a prefill)."""
    model = ExportedModel(exported)
    entry = model.description["inputs"][-1]
    assert entry["name"] == "logits_to_keep" and entry["default"] == 0
    ids = np.array(PROMPTS)
    state = model.zero_state(2)
    feeds = {"input_ids": ids, **{s["name"]: v for s, v in zip(model.state_inputs, state)}}
    unfed = model.session.run(["logits"], feeds)[0]
    all_logits, _ = model.forward(ids, state, logits_to_keep=0)
    last, _ = model.forward(ids, state, logits_to_keep=1)
    assert unfed.shape == all_logits.shape == (2, len(PROMPTS[0]), model.vocab_size)
    np.testing.assert_array_equal(unfed, all_logits)  # same graph, same inputs: bit-identical
    np.testing.assert_array_equal(last[:, 0], all_logits[:, -1])


@needs_genai
def test_genai_generates_our_greedy_tokens(exported):
    ours = ExportedModel(exported)
    theirs = GenaiModel(exported)
    want = [generate(ours, [p], N_TOKENS)[0] for p in PROMPTS]
    assert all(len(t) == N_TOKENS and 255 not in t for t in want)  # nothing stopped early
    assert len({tuple(t) for t in want}) == 2 and all(len(set(t)) > 4 for t in want)  # not a degenerate model
    for prompt, tokens in zip(PROMPTS, want):
        assert generate_genai(theirs, [prompt], N_TOKENS) == [tokens]
    # A batch of two prompts in one genai generator: rows stay independent.
    assert generate_genai(theirs, PROMPTS, N_TOKENS) == want == generate(ours, PROMPTS, N_TOKENS)


@needs_genai
def test_genai_stops_like_our_runtime(exported):
    ours = ExportedModel(exported)
    want = generate(ours, [PROMPTS[0]], N_TOKENS)[0]
    stop = want[6]
    (got,) = generate_genai(GenaiModel(exported), [PROMPTS[0]], N_TOKENS, stop_token_id=stop)
    assert [got] == generate(ours, [PROMPTS[0]], N_TOKENS, stop_token_id=stop) == [want[:want.index(stop) + 1]]


@needs_genai
def test_cli_engine_genai_prints_the_ort_tokens(exported, capsys):
    runs = {}
    for engine in ("ort", "genai"):
        argv = ["generate", str(exported), "--input-ids", "5,6,7", "--max-new-tokens", str(N_TOKENS), "--json",
                "--engine", engine]
        assert main(argv) == 0
        runs[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]
    assert runs["genai"] == runs["ort"] and len(runs["ort"]) == N_TOKENS


@needs_genai
def test_genai_refuses_ragged_batches_and_other_targets(exported, tmp_path):
    with pytest.raises(ScanExportError, match=r"prompts have lengths \[3, 1\].*--engine ort"):
        generate_genai(GenaiModel(exported), [[5, 6, 7], [8]], 4)
    plain = tmp_path / "plain"
    shutil.copytree(exported, plain)
    (plain / GENAI_CONFIG_FILE).unlink()
    with pytest.raises(ScanExportError, match="no genai_config.json .*--target genai"):
        GenaiModel(plain)


def test_missing_genai_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    with pytest.raises(ScanExportError, match=r'pip install "onnxruntime-genai>=0.18"'):
        import_genai()


def test_other_targets_stay_without_a_default(tmp_path):
    """The web host refuses to feed an input that has a default, so only --target genai gets one."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mamba", num_hidden_layers=1)
    out = export_model(ckpt, tmp_path / "export", target="web-1.30")
    assert not (out / GENAI_CONFIG_FILE).exists()
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert "logits_to_keep" in [i.name for i in session.get_inputs()] and not session.get_overridable_initializers()


@needs_node
@needs_chromium
def test_node_and_web_hosts_run_genai_exports(exported):
    """They leave logits_to_keep to its default there: onnxruntime-web 1.30 refuses to be fed an
    input that has one ("invalid input 'logits_to_keep'", measured before the host skipped it)."""
    want = generate(ExportedModel(exported), [PROMPTS[1]], N_TOKENS)[0]
    ids = ",".join(map(str, PROMPTS[1]))
    res = run_node(DEPLOY / "node" / "generate.mjs", exported, "--input-ids", ids, "--max-new-tokens", N_TOKENS, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] == want
    with serve({"/deploy/": DEPLOY, "/export/": exported}) as base:
        url = f"{base}/deploy/web/index.html?export=/export/&ids={ids}&n={N_TOKENS}"
        res = run_node(DEPLOY / "web" / "run-in-chromium.mjs", url, "--chromium", CHROMIUM)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["tokens"] == want


# Hybrids (issue 20): Mamba states next to KV caches, an attention_mask, layers of both kinds at any
# indices (Falcon-H1 and Zamba2's hybrid layers carry both). Bamba's tiny model emits 255 as its first
# token, so these runs stop at 250 instead, which none of them emits (asserted).
HYBRID_TOKENS = {"eos_token_id": 250, "pad_token_id": 250, "bos_token_id": 1}
HYBRIDS = [("bamba", "none"), ("granitemoehybrid", "none"), ("granitemoehybrid", "int4"), ("nemotron_h", "none"),
           ("falcon_h1", "none"), ("jamba", "none"), ("zamba2", "none")]


@needs_genai
@pytest.mark.parametrize("model_type,quantize", HYBRIDS, ids=[f"{t}-{q}" for t, q in HYBRIDS])
def test_genai_generates_our_greedy_tokens_for_hybrids(tmp_path, model_type, quantize):
    ckpt = with_special_tokens(make_tiny_checkpoint(tmp_path / "ckpt", model_type), HYBRID_TOKENS)
    out = export_model(ckpt, tmp_path / "export", target="genai", quantize=quantize)
    decoder = json.loads((out / GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
    desc = json.loads((out / "scan_export.json").read_text())
    kv_layers = [e["layer"] for e in desc["state"] if "key" in e]
    assert kv_layers and decoder["inputs"]["attention_mask"] == "attention_mask"
    assert decoder["inputs"]["past_key_names"] % kv_layers[0] == f"past_key_values.{kv_layers[0]}.key"
    assert decoder["head_size"] == desc["attention"]["head_dim"]
    ours, theirs = ExportedModel(out), GenaiModel(out)
    want = [generate(ours, [p], N_TOKENS)[0] for p in PROMPTS]
    assert all(len(t) == N_TOKENS and 250 not in t for t in want)  # nothing stopped early
    assert len({tuple(t) for t in want}) == 2 and all(len(set(t)) > 4 for t in want)  # not a degenerate model
    for prompt, tokens in zip(PROMPTS, want):
        assert generate_genai(theirs, [prompt], N_TOKENS) == [tokens]
    assert generate_genai(theirs, PROMPTS, N_TOKENS) == want  # a batch of two: rows stay independent
