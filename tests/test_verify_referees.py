"""`scan-export verify` on configs where transformers' default path fails on CPU (issue 24): the
referee must still run (eager MoE experts, use_cache=False forwards), and where transformers cannot
run at all, say so on one line (exit 2), never a traceback."""

import json

import pytest

pytest.importorskip("transformers", reason="verify compares against transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

from scan_export import verify  # noqa: E402
from scan_export.cli import main  # noqa: E402
from scan_export.errors import ScanExportError  # noqa: E402
from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.runtime.generate import ExportedModel  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

# transformers' own model tests use an expert width of 37 floats (148 bytes, not a multiple of 16:
# torch._grouped_mm's CPU kernel refuses it); silu because export-model refuses their gelu.
CONFIGS = {
    "jamba-16-experts-width-37": ("jamba", dict(num_experts=16, intermediate_size=37, hidden_act="silu")),
    "granitemoehybrid-width-37": ("granitemoehybrid", dict(intermediate_size=37, hidden_act="silu")),
    # attention at layer 4 of every 8: none in 2 layers; transformers 5.25's cache then cannot build a mask
    "jamba-no-attention": ("jamba", dict(num_hidden_layers=2, attn_layer_period=8, attn_layer_offset=4)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_type, overrides = CONFIGS[request.param]
    ckpt = make_tiny_checkpoint(root / "ckpt", model_type, **overrides)
    assert main(["export-model", str(ckpt), "--out", str(root / "export"), "--quiet"]) == 0
    return request.param, ckpt, root / "export"


def test_export_model_then_verify_passes(exported):
    """Short prompts and few tokens keep it to seconds; test_verify.py runs the CLI's full default."""
    name, ckpt, out = exported
    lines = []
    report = verify.verify_export(out, ckpt, prompt_lengths=(1, 9), n_tokens=4, n_prompts=2, say=lines.append)
    assert report.passed, report.format()
    assert sum(line.startswith("logits l=") for line in lines) == 2 and len(report.tokens) == 2
    if name == "jamba-no-attention":
        # One line for both referees (float64 and float32), naming the fields and transformers' version;
        # no state rows (transformers kept no cache), the greedy rows still judge our decode state.
        assert len(report.notes) == 1 and report.notes[0] in lines, lines
        note = report.notes[0]
        assert f"transformers {transformers.__version__}" in note and "attn_layer_period 8" in note, note
        assert "use_cache=False" in note and report.states == []
    else:
        assert report.notes == [], lines  # eager experts: the cached path runs, states are compared
        assert len(report.states) == len(ExportedModel(out).state_outputs)


def test_a_failure_of_transformers_itself_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """The referees loaded as transformers would by default (grouped_mm experts): transformers itself
    fails on width-37 experts in float32 (and on float64 at all), cached and uncached. The error names
    the field, the reason and transformers' version; the CLI prints it as one line, exit 2."""
    model_type, overrides = CONFIGS["jamba-16-experts-width-37"]
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", model_type, **overrides)
    monkeypatch.setattr(verify, "MOE_MODEL_TYPES", ())
    out = export_model(ckpt, tmp_path / "export")
    capsys.readouterr()
    assert main(["verify", str(out), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"transformers {transformers.__version__} float64 cannot run a forward" in err, err
    referee = verify._Referee(ckpt, json.loads((ckpt / "config.json").read_text()), "jamba", "float32")
    with pytest.raises(ScanExportError) as e:
        referee.forward(torch.zeros((1, 3), dtype=torch.long))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"--checkpoint: transformers {transformers.__version__} float32 cannot run a forward")
    assert "intermediate_size 37: its grouped_mm experts need an expert width that is a multiple of 4 floats" in message
