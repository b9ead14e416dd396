"""scan_export.runtime: no torch at import, one asserted provider, parity reports."""

import subprocess
import sys

import numpy as np
import pytest

from scan_export.onnx.scan_model import ScanModelSpec, build_scan_model
from scan_export.runtime import ParityError, ProviderUnavailableError, compare_outputs, make_session, run_on_device
from scan_export.runtime.session import has_cuda_provider


def test_runtime_import_does_not_import_torch():
    code = "import sys, scan_export, scan_export.runtime; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_session_asserts_its_provider():
    s = make_session(build_scan_model().SerializeToString(), "cpu")
    assert s.get_providers() == ["CPUExecutionProvider"]


def test_unknown_provider_is_refused():
    with pytest.raises(ValueError, match="provider: expected one of"):
        make_session(b"", "tpu")


@pytest.mark.skipif(has_cuda_provider(), reason="this build has CUDA; the refusal path cannot be shown")
def test_cuda_without_cuda_build_raises_with_install_command():
    with pytest.raises(ProviderUnavailableError, match="pip install onnxruntime-gpu"):
        make_session(build_scan_model().SerializeToString(), "cuda")


@pytest.mark.skipif(not has_cuda_provider(), reason="no CUDAExecutionProvider in this onnxruntime build")
def test_cuda_io_binding_matches_cpu():
    from scan_export.check import scan_case_inputs

    spec = ScanModelSpec()
    model = build_scan_model(spec).SerializeToString()
    feeds, _ = scan_case_inputs(spec, "heavy", 2, 300)
    cpu = run_on_device(make_session(model, "cpu"), feeds)
    gpu_session = make_session(model, "cuda")
    assert gpu_session.get_providers()[0] == "CUDAExecutionProvider"
    gpu = run_on_device(gpu_session, feeds)
    # Same float32 graph on two devices: only kernel rounding differs.
    compare_outputs(dict(zip("ab", gpu)), dict(zip("ab", cpu))).check(1e-5)


def test_parity_reports_worst_index_and_values():
    expected = np.zeros((2, 3)) + 1.0
    actual = expected.copy()
    actual[1, 2] = 1.5
    report = compare_outputs({"y": actual}, {"y": expected})
    (m,) = report.outputs
    assert m.worst_index == (1, 2) and m.actual == 1.5 and m.expected == 1.0 and m.rel == 0.5
    with pytest.raises(ParityError, match=r"y: max_abs=5.000e-01 rel=5.000e-01 at \(1, 2\)"):
        report.check(1e-3)


def test_parity_treats_nan_as_failure():
    actual = np.array([1.0, np.nan])
    report = compare_outputs({"y": actual}, {"y": np.array([1.0, 2.0])})
    assert not report.outputs[0].finite
    with pytest.raises(ParityError, match="NON-FINITE"):
        report.check(1.0)


def test_parity_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"shape \(2,\) does not match the reference's \(3,\)"):
        compare_outputs({"y": np.zeros(2)}, {"y": np.zeros(3)})
