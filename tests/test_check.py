"""`scan-export check` on op models of every I/O dtype, and on files that are not op models."""

import onnx
import pytest

from scan_export.check import DEFAULT_RTOL, check_scan_model
from scan_export.cli import main


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_check_passes_on_float16_and_float64_models(tmp_path, capsys, dtype):
    """A float16 model takes A, D, delta_bias, initial_state in float32 (its state precision): check
    feeds each input in the dtype the graph declares, and judges by the dtype's default rtol."""
    out = tmp_path / f"scan_{dtype}.onnx"
    assert main(["scan", "--dtype", dtype, "--out", str(out)]) == 0
    declared = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(out)).graph.input}
    if dtype == "float16":
        assert declared["A"] == onnx.TensorProto.FLOAT and declared["u"] == onnx.TensorProto.FLOAT16
    assert main(["check", str(out)]) == 0
    table = capsys.readouterr().out
    assert "18/18 cases pass" in table and f"rtol {DEFAULT_RTOL[dtype]:g}" in table


def test_float16_bar_still_fails_a_broken_model(tmp_path):
    """The off-by-one readout (y_t = C_t·h_{t−1}) of test_cli, in float16: 1e-3 must not hide it."""
    out = tmp_path / "scan.onnx"
    assert main(["scan", "--dtype", "float16", "--out", str(out)]) == 0
    model = onnx.load(str(out))
    body = next(n for n in model.graph.node if n.op_type == "Scan").attribute[0].g
    readout = next(n for n in body.node if n.op_type == "MatMul")
    readout.input[1] = body.input[0].name
    onnx.save(model, str(out))
    rows = check_scan_model(out, cases=((1, 1), (3, 65)))
    assert not any(r.passed for r in rows if r.seqlen > 1)
    assert min(r.out_rel for r in rows if r.seqlen > 1) > 10 * DEFAULT_RTOL["float16"]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "missing.onnx", "no such file"),
    (lambda d: d, "a directory"),
    (lambda d: _write(d / "empty.onnx", b""), "an empty file"),
    (lambda d: _write(d / "notes.onnx", b"this is a text file, not a protobuf\n"), "bytes onnx cannot parse"),
])
def test_check_refuses_files_that_are_not_onnx_in_one_line(tmp_path, capsys, make, says):
    path = make(tmp_path)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and says in err and len(err.strip().splitlines()) == 1, err


def test_check_refuses_a_truncated_model(tmp_path, capsys):
    good = tmp_path / "scan.onnx"
    assert main(["scan", "--out", str(good)]) == 0
    cut = _write(tmp_path / "cut.onnx", good.read_bytes()[: good.stat().st_size // 2])
    assert main(["check", str(cut)]) == 2
    err = capsys.readouterr().err
    assert str(cut) in err and len(err.strip().splitlines()) == 1, err
