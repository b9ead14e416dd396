"""Standalone op models in onnxruntime CPU and in onnx's ReferenceEvaluator, against the float64 oracle."""

import itertools

import numpy as np

import onnx
import pytest

from scan_export.check import scan_case_inputs
from scan_export.onnx.scan_model import ScanModelSpec, build_scan_model, read_scan_spec
from scan_export.onnx.targets import SCAN_FORMS
from scan_export.reference import selective_scan_ref
from scan_export.reference.regimes import REGIMES
from scan_export.runtime import compare_outputs, make_session

# float32 graph vs float64 sequential oracle; measured worst is ~2e-6 (README). The budget.
RTOL = 1e-5
SEQLENS = [1, 17, 64, 65, 1000, 4096]
BATCHES = [1, 3]

_sessions = {}


def session_for(spec: ScanModelSpec):
    if spec not in _sessions:
        _sessions[spec] = make_session(build_scan_model(spec).SerializeToString(), "cpu")
    return _sessions[spec]


def assert_parity(spec, regime, batch, seqlen, seed=0):
    feeds, ref_kw = scan_case_inputs(spec, regime, batch, seqlen, seed)
    out, last_state = session_for(spec).run(["out", "last_state"], feeds)
    ref_out, ref_state = selective_scan_ref(**ref_kw, return_last_state=True)
    compare_outputs({"out": out, "last_state": last_state},
                    {"out": ref_out.numpy(), "last_state": ref_state.numpy()}).check(RTOL)


@pytest.mark.parametrize("form", SCAN_FORMS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("batch,seqlen", list(itertools.product(BATCHES, SEQLENS)))
def test_one_model_every_shape(regime, groups, batch, seqlen, form):
    """One export (dynamic dim/dstate) serves every batch and seqlen, including l = 1 and ragged l."""
    assert_parity(ScanModelSpec(groups=groups, scan_form=form), regime, batch, seqlen, seed=seqlen)


@pytest.mark.parametrize("with_D,with_z,with_delta_bias,with_initial_state",
                         list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("form", SCAN_FORMS)
def test_optional_inputs(with_D, with_z, with_delta_bias, with_initial_state, regime, form):
    spec = ScanModelSpec(dim=16, dstate=8, groups=2, with_D=with_D, with_z=with_z, scan_form=form,
                         with_delta_bias=with_delta_bias, with_initial_state=with_initial_state)
    for batch, seqlen in [(1, 33), (3, 65)]:
        assert_parity(spec, regime, batch, seqlen)


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 64])
def test_other_chunk_sizes(chunk_size):
    spec = ScanModelSpec(chunk_size=chunk_size, delta_softplus=False, scan_form="chunked")
    for regime in REGIMES:
        assert_parity(spec, regime, 2, 3 * chunk_size + 1)


def test_model_is_pinned_to_the_portable_target():
    model = build_scan_model(ScanModelSpec(dim=64, dstate=16, groups=2))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10 and model.opset_import[0].version <= 21
    assert [i.name for i in model.graph.input] == ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    assert [o.name for o in model.graph.output] == ["out", "last_state"]
    assert read_scan_spec(model) == ScanModelSpec(dim=64, dstate=16, groups=2)


@pytest.mark.parametrize("form", SCAN_FORMS)
def test_float64_model_is_exact_to_rounding(form):
    spec = ScanModelSpec(dtype="float64", scan_form=form)
    feeds, ref_kw = scan_case_inputs(spec, "heavy", 2, 100)
    out, state = session_for(spec).run(["out", "last_state"], feeds)
    ref_out, ref_state = selective_scan_ref(**ref_kw, return_last_state=True)
    # float64 throughout: only summation order differs from the oracle.
    compare_outputs({"out": out, "last_state": state}, {"out": ref_out.numpy(), "last_state": ref_state.numpy()}).check(1e-12)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("groups,seqlen", [(1, 1), (2, 5), (1, 17), (2, 40)])
@pytest.mark.parametrize("form", SCAN_FORMS)
def test_reference_evaluator_agrees(regime, groups, seqlen, form):
    """A second, independent executor: onnx's pure-numpy ReferenceEvaluator."""
    from onnx.reference import ReferenceEvaluator

    spec = ScanModelSpec(groups=groups, chunk_size=8, scan_form=form)
    feeds, ref_kw = scan_case_inputs(spec, regime, 2, seqlen)
    out, state = ReferenceEvaluator(build_scan_model(spec)).run(None, feeds)
    ref_out, ref_state = selective_scan_ref(**ref_kw, return_last_state=True)
    compare_outputs({"out": out, "last_state": state},
                    {"out": ref_out.numpy(), "last_state": ref_state.numpy()}).check(RTOL)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="dim=10 must be divisible by groups=4"):
        ScanModelSpec(dim=10, groups=4)
    with pytest.raises(ValueError, match="opset must be >= 18"):
        build_scan_model(ScanModelSpec(), opset=17)
    with pytest.raises(ValueError, match="scan_form: expected one of"):
        build_scan_model(ScanModelSpec(scan_form="parallel"))


@pytest.mark.parametrize("fields, message", [
    ({"dstate": 0}, "dstate: expected a positive integer or None"),
    ({"chunk_size": True}, "chunk_size: expected a positive integer"),
    ({"groups": 0}, "groups must be >= 1"),
    ({"dtype": "bfloat16"}, "dtype must be one of"),
])
def test_both_op_specs_make_the_same_checks(fields, message):
    """ScanModelSpec and SSDModelSpec share their checks (onnx/op_spec.py): each refuses alike."""
    from scan_export.errors import ScanExportError
    from scan_export.onnx.ssd_model import SSDModelSpec

    for spec in (ScanModelSpec, SSDModelSpec):
        with pytest.raises(ScanExportError, match=message):
            spec(**fields)
    with pytest.raises(ScanExportError, match="heads=6 must be divisible by groups=4"):
        SSDModelSpec(heads=6, groups=4)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
def test_softplus_lowering_keeps_relative_precision(dtype, rtol):
    """Δ = softplus(x) as the lowering writes it, against numpy's exact logaddexp(0, x) in float64
    (torch's softplus returns x itself above 20, 1e-10 off). Small Δ (x ≪ 0) is where a plain
    log(1 + exp(x)) loses relative precision; the tolerance is a few ulps of dtype."""
    from onnx import TensorProto, helper

    from scan_export.onnx.lowering.graph_builder import GraphBuilder
    from scan_export.onnx.lowering.selective_scan import _emit_softplus

    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    gb = GraphBuilder("softplus")
    y = _emit_softplus(gb, "x", elem, dtype)
    gb.nodes.append(helper.make_node("Identity", [y], ["y"]))
    model = helper.make_model(
        gb.graph("softplus", [helper.make_tensor_value_info("x", elem, [None])], [helper.make_tensor_value_info("y", elem, [None])]),
        opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = np.concatenate([np.linspace(-60, 60, 4001), [-1e4, -200.0, -89.0, -30.0, 0.0, 1e-8, 89.0, 200.0, 1e4]]).astype(dtype)
    got = make_session(model.SerializeToString(), "cpu").run(None, {"x": x})[0]
    ref = np.logaddexp(0.0, x.astype(np.float64))
    assert np.all(np.isfinite(got))
    normal = ref > 1e-30  # below that Δ is zero for every purpose; the lowering floors e^{−|x|} at e^−80
    assert np.max(np.abs(got[normal] - ref[normal]) / ref[normal]) < rtol
    assert np.max(np.abs(got[~normal] - ref[~normal])) < 1e-30
