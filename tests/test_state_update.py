"""scan_export.selective_state_update: mamba_ssm's in-place decode step, against float64 references."""

import pytest
import torch
import torch.nn.functional as F

from scan_export import selective_state_update
from scan_export.errors import ScanExportError
from scan_export.reference import selective_scan_ref
from scan_export.reference.ssd import ssd_scan_ref

from .conftest import rel_err

# float32 step against a float64 reference: one step's rounding, measured ~1e-7; 1e-5 is the budget.
RTOL = 1e-5


def mamba_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's selective_state_update_ref, heads layout, line for line (without einops)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    dt = F.softplus(dt) if dt_softplus else dt
    dA = torch.exp(dt[..., None] * A)
    nheads, ngroups = state.shape[1], B.shape[1]
    B = B.repeat_interleave(nheads // ngroups, dim=1)
    C = C.repeat_interleave(nheads // ngroups, dim=1)
    dB = dt[..., None] * B[:, :, None, :]
    state.copy_(state * dA + dB * x[..., None])
    out = torch.einsum("bhdn,bhn->bhd", state.to(C.dtype), C)
    if D is not None:
        out += (x * D).to(out.dtype)
    return (out if z is None else out * F.silu(z)).to(x.dtype)


def mamba2_step_inputs(b=3, h=4, p=8, g=2, n=16, seed=0):
    """What Mamba2.step passes: per-head A, dt, dt_bias, D expanded over (p, n) with stride 0."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    A_h, dt_h, bias_h, D_h = -torch.rand(h, generator=gen) * 4, r(b, h), r(h) * 0.5, r(h)
    return dict(
        state=r(b, h, p, n), x=r(b, h, p), dt=dt_h[:, :, None].expand(b, h, p), A=A_h[:, None, None].expand(h, p, n),
        B=r(b, g, n), C=r(b, g, n), D=D_h[:, None].expand(h, p), z=r(b, h, p), dt_bias=bias_h[:, None].expand(h, p),
    ), (A_h, dt_h, bias_h, D_h)


def test_mamba2_expanded_heads_match_one_ssd_step():
    kw, (A_h, dt_h, bias_h, D_h) = mamba2_step_inputs()
    assert kw["A"].stride() == (1, 0, 0)
    state = kw["state"].clone()
    out = selective_state_update(**{**kw, "state": state}, dt_softplus=True)
    d = lambda t: t.double()[:, None]  # noqa: E731  one-step sequence
    ref_y, ref_state = ssd_scan_ref(d(kw["x"]), d(dt_h), A_h.double(), d(kw["B"]), d(kw["C"]), D=D_h.double(),
                                     z=d(kw["z"]), dt_bias=bias_h.double(), initial_states=kw["state"].double(),
                                     dt_softplus=True, return_final_states=True)
    assert out.shape == kw["x"].shape and out.dtype == torch.float32
    assert rel_err(out, ref_y[:, 0]) < RTOL and rel_err(state, ref_state) < RTOL  # state written in place


@pytest.mark.parametrize("with_optional", [False, True])
def test_general_per_head_A_matches_mamba_reference(with_optional):
    kw, _ = mamba2_step_inputs(seed=1)
    gen = torch.Generator().manual_seed(2)
    kw["A"] = -torch.rand(4, 8, 16, generator=gen)  # a full (h, p, n) A, every entry its own
    kw["dt"] = torch.randn(3, 4, 8, generator=gen)
    if not with_optional:
        kw.update(D=None, z=None, dt_bias=None)
    state = kw["state"].clone()
    out = selective_state_update(**{**kw, "state": state}, dt_softplus=with_optional)
    ref_state = kw["state"].double()
    ref = mamba_state_update_ref(ref_state, *(None if kw[k] is None else kw[k].double()
                                              for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")),
                                 dt_softplus=with_optional)
    assert rel_err(out, ref) < RTOL and rel_err(state, ref_state) < RTOL


def test_mamba1_layout_matches_one_scan_step():
    gen = torch.Generator().manual_seed(3)
    b, d, n = 2, 8, 4
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    state0, x, dt, A, B, C, D, z, bias = r(b, d, n), r(b, d), r(b, d), -torch.rand(d, n, generator=gen), r(b, n), \
        r(b, n), r(d), r(b, d), r(d)
    state = state0.clone()
    out = selective_state_update(state, x, dt, A, B, C, D, z, bias, True)
    s = lambda t: t.double()[..., None]  # noqa: E731
    ref, ref_state = selective_scan_ref(s(x), s(dt), A.double(), s(B), s(C), D.double(), s(z), bias.double(), True,
                                        return_last_state=True, initial_state=state0.double())
    assert out.shape == (b, d) and rel_err(out, ref[..., 0]) < RTOL and rel_err(state, ref_state) < RTOL


def test_state_batch_indices_and_padding():
    """Row i updates state[idx[i]]; idx < 0 is padding: out 0, no state touched (mamba's kernel)."""
    kw, _ = mamba2_step_inputs(b=3)
    cache = torch.randn(5, 4, 8, 16)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    before = cache.clone()
    out = selective_state_update(**{**kw, "state": cache}, dt_softplus=True, state_batch_indices=idx)
    for row, slot in ((0, 4), (2, 1)):
        one = before[slot:slot + 1].clone()
        want = selective_state_update(**{**{k: (v[row:row + 1] if k in ("x", "dt", "B", "C", "z") else v)
                                            for k, v in kw.items()}, "state": one}, dt_softplus=True)
        torch.testing.assert_close(out[row:row + 1], want, rtol=0, atol=0)
        torch.testing.assert_close(cache[slot], one[0], rtol=0, atol=0)
    assert out[1].eq(0).all()
    for slot in (0, 2, 3):
        assert torch.equal(cache[slot], before[slot])


def test_narrow_state_keeps_its_dtype():
    kw, _ = mamba2_step_inputs()
    state = kw["state"].half()
    out = selective_state_update(**{**kw, "state": state}, dt_softplus=True)
    ref_state = kw["state"].double()
    mamba_state_update_ref(ref_state, *(kw[k].double() for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")),
                           dt_softplus=True)
    assert state.dtype == torch.float16 and out.dtype == torch.float32
    assert rel_err(state.float(), ref_state) < 1e-3  # float16 storage: ~5e-4 relative


def test_bad_arguments_are_named():
    kw, _ = mamba2_step_inputs()
    with pytest.raises(ScanExportError, match=r"A must have shape \(nheads, dim, dstate\) = \(4, 8, 16\), got \(4, 8, 15\)"):
        selective_state_update(**{**kw, "A": torch.zeros(4, 8, 15)})
    with pytest.raises(ScanExportError, match="B has 3 groups, but nheads=4"):
        selective_state_update(**{**kw, "B": torch.zeros(3, 3, 16), "C": torch.zeros(3, 3, 16)})
