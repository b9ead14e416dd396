"""hidden_act for Mamba / FalconMamba / Mamba-2 (issue 20): transformers applies ACT2FN[hidden_act]
after the conv (the output gate stays silu); transformers' own CausalLMModelTester configs use gelu.
Every name in models.activations.ACTIVATIONS exports to ONNX ops of the same formula."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the activation tests compare against transformers")

from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.reference.models.activations import ACTIVATIONS, read_activation  # noqa: E402
from scan_export.reference.models.loading import load_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

from .hybrid_checks import LOGITS_RTOL, PROMPTS  # noqa: E402

# one export per family, each with another kind of activation (erf, tanh approximation, piecewise)
EXPORTS = [("mamba", "gelu_pytorch_tanh"), ("falcon_mamba", "gelu"), ("mamba2", "relu")]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("model_type,act", EXPORTS, ids=[f"{t}-{a}" for t, a in EXPORTS])
def test_exported_activation_matches_transformers(tmp_path, model_type, act):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type, hidden_act=act)
    model = ExportedModel(export_model(ckpt, tmp_path / "export"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    for seqlen in (1, 7, 33):
        ids = np.random.default_rng(seqlen).integers(0, model.vocab_size, (2, seqlen))
        logits, _ = model.forward(ids, model.zero_state(2))
        ref = hf_logits(hf, ids)
        # fp32 vs fp32, same formula, other kernels: measured ≤ 7.7e-7; 1e-4 is the issues' budget
        assert np.abs(logits - ref).max() / np.abs(ref).max() < LOGITS_RTOL, (act, seqlen)
    # transformers' greedy tokens by its full forward (pure Mamba: its cached path is exact too)
    prompt = PROMPTS[0]
    (ours,) = generate(model, [prompt], 20)
    with torch.no_grad():
        full = hf(torch.tensor([prompt + ours[:-1]])).logits[0, len(prompt) - 1:].argmax(-1).tolist()
    assert full == ours and len(set(ours)) > 4


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_supported_activation_matches_transformers_in_the_reference(tmp_path, act):
    """The whole table, eagerly (no export: each name's ONNX ops are the formula's own): our Mamba LM
    in float64 against transformers' in float64, so a wrong formula shows far above rounding."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mamba", hidden_act=act, num_hidden_layers=1)
    ours = load_model(ckpt, dtype=torch.float64).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).double().eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 9)))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids, *(s.double() for s in ours.zero_state(1)))[0]
    # float64 vs float64, but transformers returns Mamba's logits cast to float32 (`.float()`), so the
    # referee carries float32 rounding: measured ≤ 1.1e-7 relative. A wrong formula (silu for gelu,
    # tanh-GELU for erf-GELU) moves the logits by more than 1e-4.
    assert (got - want.double()).abs().max() / want.abs().max() < 1e-6


def test_unsupported_activation_is_refused_with_the_list():
    with pytest.raises(ScanExportError, match=r"field 'hidden_act': expected one of \[.*'gelu'.*\], got 'mish'"):
        read_activation({"hidden_act": "mish"}, "hidden_act", "silu")
    with pytest.raises(ScanExportError, match=r"got 1"):
        read_activation({"hidden_act": 1}, "hidden_act", "silu")
