"""The eager references: the oracle's semantics, the chunked scan against it, the decode step."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scan_export.reference import selective_scan_chunked, selective_scan_ref, selective_state_step
from scan_export.reference import selective_scan as ss
from scan_export.reference.mamba_mini import mamba_mini_chunked_scan
from scan_export.reference.regimes import REGIMES, make_scan_inputs

from .conftest import rel_err, to64

# float32 chunked vs float64 sequential: typical 1e-7..2e-6 (README table); 1e-5 is the product's
# parity budget and stays far below what a broken formulation gives (>1e-3, or NaN).
RTOL_F32 = 1e-5


def scalar_loop_oracle(u, delta, A, B, C, D, z, delta_bias, softplus, h0):
    """A literal, scalar transcription of the recurrence in float64 numpy: independent of torch
    broadcasting, so it pins the layout conventions (grouping, D, z, bias) of selective_scan_ref."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    b, d, l = u.shape
    n = A.shape[1]
    g = B.shape[1]
    y = np.zeros((b, d, l))
    h = np.array(h0, np.float64)
    for bi, di in itertools.product(range(b), range(d)):
        gi = di // (d // g)
        for t in range(l):
            dt = delta[bi, di, t] + delta_bias[di]
            if softplus:
                dt = np.log1p(np.exp(dt))
            acc = 0.0
            for ni in range(n):
                h[bi, di, ni] = np.exp(dt * A[di, ni]) * h[bi, di, ni] + dt * B[bi, gi, ni, t] * u[bi, di, t]
                acc += C[bi, gi, ni, t] * h[bi, di, ni]
            out = acc + D[di] * u[bi, di, t]
            zz = z[bi, di, t]
            y[bi, di, t] = out * zz / (1 + np.exp(-zz))
    return y, h


@pytest.mark.parametrize("groups", [1, 2])
def test_reference_matches_scalar_oracle(groups):
    kw = to64(make_scan_inputs("init", 2, 4, 3, 7, 2, with_initial_state=True, seed=3))
    out, state = selective_scan_ref(**kw, return_last_state=True)
    B = kw["B"] if kw["B"].dim() == 4 else kw["B"][:, None]
    C = kw["C"] if kw["C"].dim() == 4 else kw["C"][:, None]
    want_y, want_h = scalar_loop_oracle(
        kw["u"], kw["delta"], kw["A"], B, C, kw["D"], kw["z"], kw["delta_bias"], True, kw["initial_state"]
    )
    # Both float64, same operation order per element: only summation-order rounding differs.
    np.testing.assert_allclose(out.numpy(), want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.numpy(), want_h, rtol=1e-12, atol=1e-12)


def test_reference_float32_inputs_compute_in_float32_and_cast_back():
    kw = make_scan_inputs("easy", 2, 8, 4, 20, 1, dtype=torch.float16)
    out, state = selective_scan_ref(**kw, return_last_state=True)
    assert out.dtype == torch.float16 and state.dtype == torch.float32
    ref = selective_scan_ref(**to64(kw))
    # fp16 output: the final cast dominates (docs/numerics.md: ~4e-4 for fp16).
    assert rel_err(out, ref) < 2e-3


CHUNK = 16
LENGTHS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 200]  # l % T == 1 is the published bug


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("seqlen", LENGTHS)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_matches_float64_reference(regime, seqlen, groups):
    kw = make_scan_inputs(regime, 2, 16, 8, seqlen, groups, with_initial_state=True, seed=seqlen)
    out, state = selective_scan_chunked(**kw, return_last_state=True, chunk_size=CHUNK)
    ref, ref_state = selective_scan_ref(**to64(kw), return_last_state=True)
    assert rel_err(out, ref) < RTOL_F32
    assert rel_err(state, ref_state) < RTOL_F32


@pytest.mark.parametrize("with_D,with_z,with_delta_bias,softplus",
                         list(itertools.product([False, True], repeat=4)))
def test_chunked_optional_inputs(with_D, with_z, with_delta_bias, softplus):
    kw = make_scan_inputs("init", 2, 8, 4, 37, 2, with_D=with_D, with_z=with_z,
                          with_delta_bias=with_delta_bias, delta_softplus=softplus)
    assert rel_err(selective_scan_chunked(**kw, chunk_size=8), selective_scan_ref(**to64(kw))) < RTOL_F32


def test_chunked_fixed_B_C():
    """mamba_ssm also accepts time-invariant B, C: (d, n)."""
    kw = make_scan_inputs("easy", 2, 8, 4, 40, 1)
    kw["B"], kw["C"] = torch.randn(8, 4), torch.randn(8, 4)
    out, state = selective_scan_chunked(**kw, return_last_state=True, chunk_size=16)
    ref, ref_state = selective_scan_ref(**to64(kw), return_last_state=True)
    assert rel_err(out, ref) < RTOL_F32 and rel_err(state, ref_state) < RTOL_F32


@pytest.mark.parametrize("seqlen", [2048, 8192])
def test_chunked_long_heavy_sequences_stay_finite_and_flat(seqlen):
    kw = make_scan_inputs("heavy", 1, 16, 16, seqlen, 1, seed=7)
    ref = selective_scan_ref(**to64(kw))
    assert rel_err(selective_scan_chunked(**kw), ref) < RTOL_F32


@pytest.mark.parametrize("form", ["plain", "subchunked"])
def test_each_chunk_form_alone(form, monkeypatch):
    """Force one in-chunk form for every chunk (init regime, Λ(T=16) ≈ 25, inside both forms' range)."""
    monkeypatch.setattr(ss, "PLAIN_MAX_DECAY", float("inf") if form == "plain" else -1.0)
    kw = make_scan_inputs("init", 2, 16, 8, 50, 2, with_initial_state=True)
    out, state = selective_scan_chunked(**kw, return_last_state=True)
    ref, ref_state = selective_scan_ref(**to64(kw), return_last_state=True)
    assert rel_err(out, ref) < RTOL_F32 and rel_err(state, ref_state) < RTOL_F32


def test_plain_form_alone_overflows_where_the_gate_switches():
    """Why the gate exists: at Λ = 500 cumsum/divide alone is non-finite; the sub-chunked form is exact."""
    A_g = torch.full((1, 2, 3, 1), -500.0)  # (g, hd, n, 1)
    dt = torch.full((1, 1, 2, 1, 16), 1.0 / 16)  # (b, g, hd, 1, t): ΣΔ = 1 over the chunk
    S = dt.cumsum(-1)
    X = torch.ones(1, 1, 2, 3, 16)
    h = torch.zeros(1, 1, 2, 3)
    assert ss.chunk_decay(A_g, S[..., -1:]) > ss.PLAIN_MAX_DECAY
    assert not torch.isfinite(ss.chunk_states_plain(h, A_g, S, X)).all()
    H = ss.chunk_states_subchunked(h, A_g, dt, X)
    a = torch.exp(torch.tensor(-500.0 / 16))  # sequential: h_t = a·h_{t−1} + 1
    want = torch.stack([sum(a**k for k in range(t + 1)) for t in range(16)])
    torch.testing.assert_close(H[0, 0, 0, 0], want, rtol=1e-6, atol=0)


def test_mamba_mini_baseline_returns_nan_in_heavy_regime():
    """The published form's failure (docs/numerics.md), kept as a witness; our scan is finite on the same input."""
    kw = make_scan_inputs("heavy", 1, 16, 16, 128, 1, with_z=False, seed=2)
    kw.pop("z"), kw.pop("initial_state")
    assert not torch.isfinite(mamba_mini_chunked_scan(**kw)).all()
    assert torch.isfinite(selective_scan_chunked(**kw)).all()


def test_state_update_equals_one_scan_step():
    kw = make_scan_inputs("init", 3, 8, 4, 1, 2, with_initial_state=True)
    y, new_state = selective_state_step(
        kw["initial_state"], kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0],
        D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"], dt_softplus=True,
    )
    ref, ref_state = selective_scan_ref(**to64(kw), return_last_state=True)
    assert rel_err(y, ref[..., 0]) < RTOL_F32 and rel_err(new_state, ref_state) < RTOL_F32


def test_decode_steps_continue_a_prefill():
    """prefill(l=20) then 5 decode steps == one scan over 25 steps."""
    kw = make_scan_inputs("init", 2, 8, 4, 25, 1, seed=4)
    _, state = selective_scan_chunked(**{k: (v[..., :20] if k in ("u", "delta", "z", "B", "C") else v)
                                         for k, v in kw.items()}, return_last_state=True)
    ys = []
    for t in range(20, 25):
        y, state = selective_state_step(state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t],
                                          kw["C"][..., t], kw["D"], kw["z"][..., t], kw["delta_bias"], True)
        ys.append(y)
    ref = selective_scan_ref(**to64(kw))
    assert rel_err(torch.stack(ys, -1), ref[..., 20:]) < RTOL_F32


GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_gradients_match_reference(regime, groups):
    kw = make_scan_inputs(regime, 2, 8, 4, 41, groups, with_initial_state=True, seed=5)
    leaves = {k: kw[k].clone().requires_grad_(True) for k in GRAD_NAMES}
    args = {**kw, **leaves}
    out, state = selective_scan_chunked(**args, return_last_state=True, chunk_size=16)
    g_out, g_state = torch.randn_like(out), torch.randn_like(state)
    grads = torch.autograd.grad([out, state], list(leaves.values()), [g_out, g_state])
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    ref_out, ref_state = selective_scan_ref(**{**to64(kw), **ref_leaves}, return_last_state=True)
    ref_grads = torch.autograd.grad([ref_out, ref_state], list(ref_leaves.values()),
                                    [g_out.double(), g_state.double()])
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        # mamba_ssm's own fp32 gradient tolerances (tests/ops/test_selective_scan.py).
        torch.testing.assert_close(got.double(), want, rtol=6e-4, atol=2e-3, msg=lambda m: f"grad {name}: {m}")


def test_causal_conv_with_state_matches_torch_conv1d():
    """Channels-last conv with K−1 state == F.conv1d over the whole history, split anywhere."""
    from scan_export.reference.conv import causal_conv1d_with_state

    torch.manual_seed(1)
    b, c, k, l = 2, 6, 4, 20
    x = torch.randn(b, l, c)
    w, bias = torch.randn(c, 1, k), torch.randn(c)
    want = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w, bias, groups=c).transpose(1, 2)
    y1, state = causal_conv1d_with_state(x[:, :13], torch.zeros(b, k - 1, c), w, bias)
    y2, _ = causal_conv1d_with_state(x[:, 13:], state, w, bias)
    torch.testing.assert_close(torch.cat([y1, y2], 1), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"conv_state must be \(batch, 3, 6\), got \(2, 6, 3\)"):
        causal_conv1d_with_state(x, torch.zeros(b, c, k - 1), w, bias)
