"""Mamba-2 SSD: the sequential oracle, the chunked scan, the ONNX lowering and the drop-in op."""

import itertools

import pytest
import torch

from scan_export import mamba_chunk_scan_combined
from scan_export.onnx.export import export
from scan_export.onnx.ssd_model import SSDModelSpec, build_ssd_model
from scan_export.reference.regimes import REGIMES, make_ssd_inputs
from scan_export.reference.ssd import segsum_exp, ssd_scan_chunked, ssd_scan_ref, ssd_state_update
from scan_export.runtime import compare_outputs, make_session

from .conftest import rel_err, to64
from .test_export_module import op_histogram

# float32 against the float64 oracle: measured ≤ 3e-7; 1e-5 is the budget.
RTOL = 1e-5
SEQLENS = [1, 63, 64, 65, 1000, 4096]


def test_reference_matches_transformers_mamba2_chunk_scan():
    """An independent implementation of the same semantics: transformers' torch fallback."""
    hf = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    kw = to64(make_ssd_inputs("init", 2, 70, 4, 8, 2, with_initial_states=True))
    ref, state = ssd_scan_ref(**kw, return_final_states=True)
    theirs, their_state = hf.mamba2_chunk_scan(
        kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], 32, D=kw["D"], dt_bias=kw["dt_bias"],
        initial_states=kw["initial_states"], dt_softplus=True, return_final_states=True)
    # transformers computes in float32 whatever the input dtype (its `.float()` casts): float32 rounding.
    assert rel_err(theirs, ref) < RTOL and rel_err(their_state, state) < RTOL


def test_segsum_is_exact_where_subtraction_is_not():
    a = torch.full((64,), -1000.0 / 64, dtype=torch.float32)  # |A|·ΣΔ = 1000 over the chunk
    L = segsum_exp(a)
    assert torch.isfinite(L).all() and L.diagonal().eq(1).all() and L.triu(1).eq(0).all()
    want = torch.exp(torch.tensor(-1000.0 / 64, dtype=torch.float64))
    assert abs(L[40, 39].double() - want) / want < 1e-6


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("seqlen", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_matches_reference(regime, seqlen, groups):
    kw = make_ssd_inputs(regime, 2, seqlen, 4, 8, groups, with_initial_states=True, with_z=True, seed=seqlen)
    y, s = ssd_scan_chunked(**kw, return_final_states=True)
    ref, ref_s = ssd_scan_ref(**to64(kw), return_final_states=True)
    assert rel_err(y, ref) < RTOL and rel_err(s, ref_s) < RTOL


def test_dt_limit_and_per_channel_D():
    kw = make_ssd_inputs("heavy", 2, 50, 4, 8, 2, d_per_channel=True, seed=3)
    out = ssd_scan_chunked(**kw, dt_limit=(0.01, 0.5), chunk_size=16)
    ref = ssd_scan_ref(**to64(kw), dt_limit=(0.01, 0.5))
    assert rel_err(out, ref) < RTOL
    assert rel_err(ref, ssd_scan_ref(**to64(kw))) > 1e-3  # the limit really changed the result


def test_state_update_continues_a_prefill():
    kw = make_ssd_inputs("init", 2, 30, 4, 8, 2, with_z=True, seed=4)
    head = {k: (v[:, :25] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    _, state = ssd_scan_chunked(**head, return_final_states=True, chunk_size=8)
    ys = []
    for t in range(25, 30):
        y, state = ssd_state_update(state, kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t],
                                    kw["D"], kw["z"][:, t], kw["dt_bias"], True)
        ys.append(y)
    assert rel_err(torch.stack(ys, 1), ssd_scan_ref(**to64(kw))[:, 25:]) < RTOL


def test_chunked_gradients_match_reference():
    kw = make_ssd_inputs("init", 2, 37, 4, 8, 2, with_initial_states=True, with_z=True, seed=6)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    leaves = {k: kw[k].clone().requires_grad_(True) for k in names}
    y, s = mamba_chunk_scan_combined(**{**kw, **leaves}, chunk_size=16, return_final_states=True)
    (y.sum() + s.square().sum()).backward()
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    ry, rs = ssd_scan_ref(**{**to64(kw), **ref_leaves}, return_final_states=True)
    (ry.sum() + rs.square().sum()).backward()
    for k in names:  # mamba_ssm's fp32 gradient tolerances
        torch.testing.assert_close(leaves[k].grad.double(), ref_leaves[k].grad, rtol=6e-4, atol=2e-3)


_sessions = {}


def run_model(spec, kw):
    if spec not in _sessions:
        _sessions[spec] = make_session(build_ssd_model(spec).SerializeToString(), "cpu")
    feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    return _sessions[spec].run(["y", "final_states"], feeds)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("groups,headdim", list(itertools.product([1, 2], [32, 64])))
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("with_initial_states", [False, True])
def test_onnx_model_matches_reference(regime, groups, headdim, seqlen, with_initial_states):
    spec = SSDModelSpec(groups=groups, with_initial_states=with_initial_states)
    kw = make_ssd_inputs(regime, 2 if seqlen < 4096 else 1, seqlen, 4, headdim, groups,
                         with_initial_states=with_initial_states, seed=seqlen)
    y, s = run_model(spec, kw)
    ref, ref_s = ssd_scan_ref(**to64(kw), return_final_states=True)
    compare_outputs({"y": y, "final_states": s}, {"y": ref.numpy(), "final_states": ref_s.numpy()}).check(RTOL)


@pytest.mark.parametrize("with_D,d_per_channel,with_z,with_dt_bias",
                         [c for c in itertools.product([False, True], repeat=4) if c[0] or not c[1]])
def test_onnx_optional_inputs(with_D, d_per_channel, with_z, with_dt_bias):
    spec = SSDModelSpec(groups=2, with_D=with_D, d_per_channel=d_per_channel, with_z=with_z, with_dt_bias=with_dt_bias,
                        dt_limit=(0.0, 2.0), chunk_size=16)
    kw = make_ssd_inputs("heavy", 2, 40, 4, 8, 2, with_D=with_D, d_per_channel=d_per_channel, with_z=with_z,
                         with_dt_bias=with_dt_bias, with_initial_states=True)
    y, s = run_model(spec, kw)
    ref, ref_s = ssd_scan_ref(**to64(kw), dt_limit=(0.0, 2.0), return_final_states=True)
    compare_outputs({"y": y, "final_states": s}, {"y": ref.numpy(), "final_states": ref_s.numpy()}).check(RTOL)


@pytest.mark.parametrize("seqlen", [1, 9, 20])
def test_reference_evaluator_agrees(seqlen):
    from onnx.reference import ReferenceEvaluator

    spec = SSDModelSpec(groups=2, chunk_size=8)
    kw = make_ssd_inputs("heavy", 2, seqlen, 4, 8, 2, with_initial_states=True)
    feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    y, s = ReferenceEvaluator(build_ssd_model(spec)).run(None, feeds)
    ref, ref_s = ssd_scan_ref(**to64(kw), return_final_states=True)
    compare_outputs({"y": y, "final_states": s}, {"y": ref.numpy(), "final_states": ref_s.numpy()}).check(RTOL)


class SSDBlock(torch.nn.Module):
    """x: (b, l, d_model) -> projections -> mamba_chunk_scan_combined -> (b, l, d_model)."""

    def __init__(self, d_model=16, heads=4, headdim=8, groups=2, dstate=8):
        super().__init__()
        self.h, self.p, self.g, self.n = heads, headdim, groups, dstate
        self.proj = torch.nn.Linear(d_model, heads * headdim + heads + 2 * groups * dstate)
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1.0, heads + 1)))
        self.D = torch.nn.Parameter(torch.ones(heads))
        self.dt_bias = torch.nn.Parameter(torch.zeros(heads))
        self.out = torch.nn.Linear(heads * headdim, d_model)

    def forward(self, u):
        b, l, _ = u.shape
        x, dt, B, C = self.proj(u).split([self.h * self.p, self.h, self.g * self.n, self.g * self.n], dim=-1)
        y = mamba_chunk_scan_combined(
            x.reshape(b, l, self.h, self.p), dt, -torch.exp(self.A_log), B.reshape(b, l, self.g, self.n),
            C.reshape(b, l, self.g, self.n), 16, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        return self.out(y.reshape(b, l, -1))


def test_drop_in_exports_as_one_loop_with_dynamic_shapes():
    torch.manual_seed(0)
    m = SSDBlock().eval()
    dyn = torch.export.Dim.DYNAMIC
    models = [export(m, (torch.randn(2, l, 16),), dynamic_shapes=({0: dyn, 1: dyn},)) for l in (8, 300)]
    assert op_histogram(models[0]) == op_histogram(models[1]) and op_histogram(models[0])["Loop"] == 1
    s = make_session(models[0].SerializeToString(), "cpu")
    for b, l in [(1, 1), (3, 50), (1, 257)]:
        u = torch.randn(b, l, 16)
        got = s.run(None, {s.get_inputs()[0].name: u.numpy()})[0]
        with torch.no_grad():
            want = m(u)
        assert rel_err(got, want) < 1e-5


def test_bad_ssd_input_is_named():
    kw = make_ssd_inputs("easy", 2, 10, 4, 8, 2)
    with pytest.raises(ValueError, match=r"B has 3 groups, but heads=4 is not divisible by groups"):
        ssd_scan_ref(**{**kw, "B": torch.randn(2, 10, 3, 16), "C": torch.randn(2, 10, 3, 16)})
    with pytest.raises(ValueError, match=r"dt must have shape \(batch, seqlen, heads\) = \(2, 10, 4\), got \(2, 11, 4\)"):
        ssd_scan_chunked(**{**kw, "dt": torch.randn(2, 11, 4)})
    with pytest.raises(ValueError, match=r"seq_idx must have shape \(batch, seqlen\) = \(2, 10\), got \(2, 11\)"):
        mamba_chunk_scan_combined(**kw, seq_idx=torch.zeros(2, 11, dtype=torch.int32))


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("groups", [1, 2])
def test_native_and_portable_lowerings_agree(regime, groups):
    sessions = {
        lw: make_session(build_ssd_model(SSDModelSpec(heads=4, groups=groups, lowering=lw),
                                         target="ort-1.32" if lw == "native" else "portable").SerializeToString(), "cpu")
        for lw in ("portable", "native")
    }
    for seqlen in (1, 63, 65, 1000):
        kw = make_ssd_inputs(regime, 2, seqlen, 4, 32, groups, with_initial_states=True, seed=seqlen)
        feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
        (yp, sp), (yn, sn) = (sessions[lw].run(["y", "final_states"], feeds) for lw in ("portable", "native"))
        # Two float32 implementations of the same recurrence (chunked vs onnxruntime's kernel).
        compare_outputs({"y": yn, "final_states": sn}, {"y": yp, "final_states": sp}).check(RTOL)
        ref, ref_s = ssd_scan_ref(**to64(kw), return_final_states=True)
        compare_outputs({"y": yn, "final_states": sn}, {"y": ref.numpy(), "final_states": ref_s.numpy()}).check(RTOL)


def test_native_lowering_is_refused_by_opset_21_targets():
    with pytest.raises(ValueError, match=r"native lowering needs opset >= 27.*--target ort-1.32"):
        build_ssd_model(SSDModelSpec(heads=4, lowering="native"), target="node-1.30")
    with pytest.raises(ValueError, match="needs a static head count"):
        build_ssd_model(SSDModelSpec(lowering="native"), target="ort-1.32")
    model = build_ssd_model(SSDModelSpec(heads=4, lowering="native"), target="ort-1.32")
    assert model.ir_version == 13 and model.opset_import[0].version == 27
    assert any(n.op_type == "LinearAttention" for n in model.graph.node)
