"""The CLI maps flags onto library calls without dropping any."""

import json

import onnx
import pytest

from scan_export.bench.scan import bench_scan
from scan_export.cli import build_parser, main, scan_spec_from_args
from scan_export.onnx.scan_model import ScanModelSpec, read_scan_spec

from .test_export_module import op_histogram


def test_scan_flags_round_trip(tmp_path):
    out = tmp_path / "scan.onnx"
    argv = ["scan", "--dim", "64", "--dstate", "16", "--groups", "2", "--no-z", "--no-D", "--no-delta-bias",
            "--no-initial-state", "--no-softplus", "--scan-form", "chunked", "--chunk-size", "8", "--opset", "20",
            "--out", str(out)]
    assert main(argv) == 0
    model = onnx.load(str(out))
    want = ScanModelSpec(dim=64, dstate=16, groups=2, with_D=False, with_z=False, with_delta_bias=False,
                         with_initial_state=False, delta_softplus=False, chunk_size=8, scan_form="chunked")
    assert read_scan_spec(model) == want
    assert scan_spec_from_args(build_parser().parse_args(argv)) == want
    assert [i.name for i in model.graph.input] == ["u", "delta", "A", "B", "C"]
    assert model.opset_import[0].version == 20
    assert op_histogram(model)["Loop"] == 1 and op_histogram(model)["Scan"] == 0  # the chunked form, as asked
    b_shape = [d.dim_value or d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert b_shape == ["batch", 2, 16, "seqlen"]


def test_scan_defaults_are_all_inputs_dynamic_dims(tmp_path):
    out = tmp_path / "scan.onnx"
    assert main(["scan", "--out", str(out)]) == 0
    model = onnx.load(str(out))
    assert read_scan_spec(model) == ScanModelSpec()
    u_shape = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert u_shape == ["batch", "dim", "seqlen"]


def test_check_command_passes_on_a_good_model(tmp_path, capsys):
    out = tmp_path / "scan.onnx"
    assert main(["scan", "--groups", "2", "--out", str(out)]) == 0
    assert main(["check", str(out)]) == 0
    table = capsys.readouterr().out
    assert "18/18 cases pass" in table and "heavy" in table


def test_check_command_fails_on_a_broken_model(tmp_path, capsys):
    """A model with an off-by-one readout (y_t = C_t·h_{t−1}, the state before the update) must fail check."""
    out = tmp_path / "scan.onnx"
    assert main(["scan", "--out", str(out)]) == 0
    model = onnx.load(str(out))
    scan = next(n for n in model.graph.node if n.op_type == "Scan")  # the sequential form
    body = scan.attribute[0].g
    readout = next(n for n in body.node if n.op_type == "MatMul")  # y_t = C_t·h_t
    readout.input[1] = body.input[0].name  # h_{t−1}
    onnx.save(model, str(out))
    assert main(["check", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_refuses_a_non_scan_model(tmp_path, capsys):
    path = tmp_path / "other.onnx"
    g = onnx.helper.make_graph([], "g", [], [])
    onnx.save(onnx.helper.make_model(g), str(path))
    assert main(["check", str(path)]) == 2
    assert "not a scan_export op model" in capsys.readouterr().err


def test_bench_reports_every_implementation_and_ratio(tmp_path):
    results = bench_scan(shapes=((1, 32, 4, 64),), repeats=1)
    (entry,) = results["shapes"]
    assert len(entry["median_ms"]) == 5
    assert all(v > 0 for v in entry["speedup_vs_mamba_mini"].values())
    json.dumps(results)


def test_ssd_bench_reports_every_implementation(tmp_path):
    from scan_export.bench.ssd import bench_ssd, format_ssd_bench

    results = bench_ssd(shape=(1, 2, 4, 8, 40), repeats=1)
    assert len(results["median_ms"]) == 4 and "SSD scan" in format_ssd_bench(results)


def test_every_flag_has_help_with_its_default():
    """`scan-export X --help` documents every flag; a flag with a meaningful default shows it."""
    import argparse

    from scan_export.cli import MAX_NEW_TOKENS, SCAN_CHUNK_SIZE
    from scan_export.reference import DEFAULT_CHUNK_SIZE
    from scan_export.runtime.generate import MAX_NEW_TOKENS as RUNTIME_MAX_NEW_TOKENS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"scan", "check", "bench", "export-model", "generate", "verify", "demo", "doctor"}
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            if action.default not in (None, False) and not action.required:
                assert "default" in p._get_formatter()._get_help_string(action), (name, action.dest)
        assert "(default:" in text or name == "check"
    assert SCAN_CHUNK_SIZE == DEFAULT_CHUNK_SIZE
    assert MAX_NEW_TOKENS == RUNTIME_MAX_NEW_TOKENS


def test_version(capsys):
    from scan_export import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"scan-export {__version__}"


def test_doctor_runs_check_and_generate_on_cpu(capsys):
    """The same report a GPU machine gives, on CPU: both scan forms pass check and agree on tokens."""
    assert main(["doctor", "--provider", "cpu", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    for form in ("sequential", "chunked"):
        assert f"check     cpu   {form:<10} 18/18 cases" in out and f"generate  cpu   {form}" in out
    assert "tokens    identical" in out and out.strip().endswith("PASS")


def test_doctor_refuses_a_missing_provider(capsys):
    from scan_export.runtime.session import has_cuda_provider

    if has_cuda_provider():
        pytest.skip("this onnxruntime has CUDA")
    assert main(["doctor", "--provider", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--provider cuda" in err[0]


def test_cli_model_types_are_the_packages():
    """cli.MODEL_TYPES is written out (the parser must not import torch); it must name every family."""
    from scan_export.cli import MODEL_TYPES
    from scan_export.reference.models import HYBRID_MODEL_TYPES, SUPPORTED_MODEL_TYPES

    assert sorted(MODEL_TYPES) == sorted((*SUPPORTED_MODEL_TYPES, *HYBRID_MODEL_TYPES))
    help_text = build_parser()._subparsers._group_actions[0].choices["export-model"].format_help()
    assert all(t in help_text for t in MODEL_TYPES)
