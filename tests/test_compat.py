"""scan_export.compat: upstream's import lines answered by our drop-ins. Code written against
mamba_ssm's and causal_conv1d's public APIs runs on CPU and exports with a plain
torch.onnx.export(dynamo=True), the compat import its only change; plus the two plain-export
bugs of issue 23 (d_state = 1 at a static batch of 1, a second export in one process).

The blocks below are written as upstream writes them (mamba_ssm's Mamba fused and reference
paths, Mamba2's mem-efficient path, Vim's bimamba v2, the prenorm Block with the fused RMSNorm),
importing from `mamba_ssm` / `causal_conv1d` only; they are our re-implementations, not copies.
"""

import copy
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import scan_export.compat.mamba_ssm  # noqa: F401  (the one import line)
from scan_export import compat
from scan_export.reference import selective_scan_ref as oracle_scan
from scan_export.reference.ssd import ssd_scan_ref
from scan_export.runtime import make_session

from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import (bimamba_inner_fn, mamba_inner_fn,  # noqa: E402
                                                    mamba_inner_fn_no_out_proj, selective_scan_fn)
from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn, rms_norm_fn  # noqa: E402
from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated  # noqa: E402
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined  # noqa: E402
import selective_scan_cuda  # noqa: E402

from .conftest import rel_err
from .test_export_module import op_histogram
from .test_plain_export import dt_proj_init, plain_export, run

DYN = torch.export.Dim.DYNAMIC
# float32 graph vs float32 eager and vs the float64 block: the project's 1e-5 parity budget
# (eager scans sequentially, the graph too, so the two differ by rounding order only).
RTOL = 1e-5
# float64 unit checks of one function against an independent float64 composition: both exact to
# ~1e-16, so 1e-12 leaves room for summation order only.
RTOL64 = 1e-12


# ------------------------------------------------------------------------------------------------
# Blocks as upstream writes them


class Mamba(nn.Module):
    """mamba_ssm's Mamba (mamba_simple): use_fast_path -> mamba_inner_fn; else causal_conv1d_fn +
    selective_scan_fn, the reference path."""

    def __init__(self, d_model=16, d_state=8, d_conv=4, expand=2, use_fast_path=True):
        super().__init__()
        self.d_state, self.d_inner, self.use_fast_path = d_state, expand * d_model, use_fast_path
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        dt_proj_init(self.dt_proj, self.dt_rank)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log, self.D = nn.Parameter(torch.log(A)), nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden_states):
        seqlen = hidden_states.shape[1]
        # upstream's in_proj without a transpose: "d (b l) -> b d l"
        xz = (self.in_proj.weight @ hidden_states.flatten(0, 1).t()).unflatten(1, (-1, seqlen)).transpose(0, 1)
        A = -torch.exp(self.A_log.float())
        if self.use_fast_path:
            return mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                                  self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                                  delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x_dbl = self.x_proj(x.transpose(1, 2).flatten(0, 1))  # (b·l, r + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).unflatten(1, (-1, seqlen)).transpose(0, 1)  # (b, d, l)
        B = B.unflatten(0, (-1, seqlen)).transpose(1, 2).contiguous()
        C = C.unflatten(0, (-1, seqlen)).transpose(1, 2).contiguous()
        y = selective_scan_fn(x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True, return_last_state=False)
        return self.out_proj(y.transpose(1, 2))


class VimMamba(Mamba):
    """Vim's Mamba with bimamba_type="v2": its own conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b for
    the flipped sequence, both through mamba_inner_fn_no_out_proj, averaged (if_devide_out)."""

    def __init__(self, d_model=16, d_state=8, d_conv=4, expand=2):
        super().__init__(d_model, d_state, d_conv, expand)
        self.conv1d_b = copy.deepcopy(self.conv1d)
        nn.init.normal_(self.conv1d_b.weight, std=0.3)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner)
        dt_proj_init(self.dt_proj_b, self.dt_rank)
        self.A_b_log = nn.Parameter(torch.log(torch.rand(self.d_inner, d_state) * 8 + 1))
        self.D_b = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, hidden_states):
        xz = self.in_proj(hidden_states).transpose(1, 2)
        A, A_b = -torch.exp(self.A_log.float()), -torch.exp(self.A_b_log.float())
        out = mamba_inner_fn_no_out_proj(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                         self.dt_proj.weight, A, None, None, self.D.float(),
                                         delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        out_b = mamba_inner_fn_no_out_proj(xz.flip([-1]), self.conv1d_b.weight, self.conv1d_b.bias,
                                           self.x_proj_b.weight, self.dt_proj_b.weight, A_b, None, None,
                                           self.D_b.float(), delta_bias=self.dt_proj_b.bias.float(),
                                           delta_softplus=True)
        return F.linear((out + out_b.flip([-1])).transpose(1, 2) / 2, self.out_proj.weight, self.out_proj.bias)


class Mamba2(nn.Module):
    """mamba_ssm's Mamba2 on its default use_mem_eff_path: mamba_split_conv1d_scan_combined with the
    gated RMSNorm's weight (norm_before_gate=False, groups of d_ssm / ngroups) and out_proj.
    chunk_size 16 so that test lengths cross chunks."""

    def __init__(self, d_model=16, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=16):
        super().__init__()
        self.d_inner, self.headdim, self.ngroups, self.chunk_size = expand * d_model, headdim, ngroups, chunk_size
        self.nheads = self.d_inner // headdim
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=False, group_size=self.d_inner // ngroups)
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u):
        zxbcdt = self.in_proj(u)
        A = -torch.exp(self.A_log.float())
        return mamba_split_conv1d_scan_combined(
            zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A, D=self.D,
            chunk_size=self.chunk_size, seq_idx=None, activation="silu", rmsnorm_weight=self.norm.weight,
            rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias,
            headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=False)


class Block(nn.Module):
    """mamba_ssm's Block with fused_add_norm: hidden, residual = RMSNorm(hidden, residual, prenorm=True,
    residual_in_fp32=True), then the mixer."""

    def __init__(self, mixer, d_model=16):
        super().__init__()
        self.norm, self.mixer = RMSNorm(d_model, eps=1e-5), mixer
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)

    def forward(self, hidden_states, residual=None):
        hidden_states, residual = self.norm(hidden_states, residual=residual, prenorm=True, residual_in_fp32=True)
        return self.mixer(hidden_states), residual


class Upstream(nn.Module):
    """Every block above on one (b, l, d_model) input: one export covers them all."""

    def __init__(self):
        super().__init__()
        self.fast, self.ref = Block(Mamba()), Mamba(use_fast_path=False)
        self.ref.load_state_dict(self.fast.mixer.state_dict())
        self.vim, self.mamba2 = VimMamba(), Block(Mamba2())

    def forward(self, x):
        h, residual = self.fast(x)
        h2, residual2 = self.mamba2(h, residual)
        return h, self.vim(x), h2, residual2


@pytest.fixture(scope="module")
def upstream():
    torch.manual_seed(0)
    module = Upstream().eval()
    model = plain_export(module, (torch.randn(2, 24, 16),), ({0: DYN, 1: DYN},))
    return module, model


def test_upstream_blocks_export_plainly_and_match_eager_and_float64(upstream):
    module, model = upstream
    hist = op_histogram(model)
    # mamba_inner_fn 1, Vim 2, Mamba2's SSD 1: one Scan per scan call, nothing unrolled.
    assert hist["Scan"] == 4 and hist["Loop"] == 0
    oracle = copy.deepcopy(module).double()  # our drop-ins in float64 (checked against the oracles below)
    session = make_session(model.SerializeToString(), "cpu")
    for b, l in ((1, 1), (3, 17), (2, 70)):  # none is the example's (2, 24)
        torch.manual_seed(b * 100 + l)
        x = torch.randn(b, l, 16)
        got = session.run(None, {model.graph.input[0].name: x.numpy()})
        with torch.no_grad():
            eager = module(x)
            ref = oracle(x.double())
        for k, (o, e, r) in enumerate(zip(got, eager, ref)):
            assert rel_err(o, e) < RTOL and rel_err(o, r) < RTOL, (b, l, k)
        # mamba's reference path (causal_conv1d_fn + selective_scan_fn) is the fused path's block: equal
        # to rounding (eager only: the same ops the graph already covers)
        with torch.no_grad():
            assert rel_err(module.ref(module.fast.norm(x)), eager[0]) < RTOL, (b, l)


def test_vim_v2_keeps_both_directions():
    """Zeroing the backward direction's D and its input conv changes the output: the flipped scan
    is really there (Vim's own use_fast_path=False path drops it)."""
    torch.manual_seed(0)
    vim = VimMamba().eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        before = vim(x)
        vim.x_proj_b.weight.mul_(3.0)
        after = vim(x)
    assert rel_err(after, before) > 1e-3


# ------------------------------------------------------------------------------------------------
# Each function against an independent float64 composition


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_causal_conv1d_fn_and_update():
    b, d, l, w = 2, 6, 11, 4
    x, weight, bias, h0 = _f64(b, d, l), _f64(d, w), _f64(d), _f64(b, d, w - 1)
    full = F.conv1d(torch.cat([h0, x], -1), weight.unsqueeze(1), bias, groups=d)  # the history, then x
    out, final = causal_conv1d_fn(x, weight, bias, initial_states=h0, return_final_states=True, activation="silu")
    assert rel_err(out, F.silu(full)) < RTOL64 and torch.equal(final, x[..., -(w - 1):])
    plain = F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :l]  # mamba's reference
    assert rel_err(causal_conv1d_fn(x, weight, bias), plain) < RTOL64
    # decode: state of 5 (> w - 1) steps, fed one step and then three
    state = torch.cat([_f64(b, d, 5 - (w - 1)), h0], -1)
    history = state.clone()
    y1 = causal_conv1d_update(x[..., 0], state, weight, bias, activation="silu")
    y3 = causal_conv1d_update(x[..., 1:4], state, weight, bias, activation="silu")
    assert rel_err(torch.cat([y1[..., None], y3], -1), F.silu(full[..., :4])) < RTOL64
    assert torch.equal(state, torch.cat([history, x[..., :4]], -1)[..., 4:])


def test_norms():
    x, res, w, bias = _f64(3, 5, 8), _f64(3, 5, 8), _f64(8), _f64(8)
    s = x + res
    out, new_res = rms_norm_fn(x, w, None, residual=res, prenorm=True, eps=1e-6)
    assert rel_err(out, s / torch.sqrt(s.square().mean(-1, keepdim=True) + 1e-6) * w) < RTOL64
    assert torch.equal(new_res, s)
    ln = layer_norm_fn(x, w, bias, residual=res, eps=1e-6)
    assert rel_err(ln, F.layer_norm(s, (8,), w, bias, eps=1e-6)) < RTOL64
    # residual_in_fp32: the new residual is float32 whatever x is (mamba's Block relies on it)
    _, r32 = RMSNorm(8)(x.float(), residual=None, prenorm=True, residual_in_fp32=True)
    assert r32.dtype == torch.float32
    z = _f64(3, 5, 8)
    gated = RMSNormGated(8, eps=1e-5, group_size=4, norm_before_gate=False).double()
    g = (x * F.silu(z)).unflatten(-1, (2, 4))
    expect = (g / torch.sqrt(g.square().mean(-1, keepdim=True) + 1e-5)).flatten(-2)
    assert rel_err(gated(x, z), expect) < RTOL64


def _mamba_ref_scan(u, delta, A, B, C, D, z, delta_bias):
    return oracle_scan(u, delta, A, B, C, D, z, delta_bias, True)


def test_inner_fns_against_their_composition():
    torch.manual_seed(0)
    b, d, l, n, r, w, dm = 2, 8, 13, 4, 2, 4, 5
    xz, cw, cb = _f64(b, 2 * d, l), _f64(d, 1, w), _f64(d)
    xw, dw, ow, ob = _f64(r + 2 * n, d), _f64(d, r) * 0.5, _f64(dm, d), _f64(dm)
    A, A_b, D, db = -torch.rand(d, n, dtype=torch.float64) - 0.5, -torch.rand(d, n, dtype=torch.float64), _f64(d), _f64(d)
    x, z = xz.chunk(2, 1)
    xc = F.silu(F.conv1d(x, cw, cb, padding=w - 1, groups=d)[..., :l])
    dbl = torch.einsum("bdl,cd->blc", xc, xw)  # (b, l, r + 2n)
    delta = torch.einsum("blr,dr->bdl", dbl[..., :r], dw)
    B, C = dbl[..., r:r + n].transpose(1, 2), dbl[..., r + n:].transpose(1, 2)
    y = _mamba_ref_scan(xc, delta, A, B, C, D, z, db)
    got = mamba_inner_fn(xz, cw, cb, xw, dw, ow, ob, A, None, None, D, delta_bias=db)
    assert rel_err(got, F.linear(y.transpose(1, 2), ow, ob)) < RTOL64
    assert rel_err(mamba_inner_fn_no_out_proj(xz, cw, cb, xw, dw, A, None, None, D, delta_bias=db), y) < RTOL64
    y_b = _mamba_ref_scan(xc.flip(-1), delta.flip(-1), A_b, B.flip(-1), C.flip(-1), D, z.flip(-1), db).flip(-1)
    got = bimamba_inner_fn(xz, cw, cb, xw, dw, ow, ob, A, A_b, None, None, D, delta_bias=db)
    assert rel_err(got, F.linear((y + y_b).transpose(1, 2), ow, ob)) < RTOL64
    # Jamba's inner RMSNorms on B, C (over n) and Δ (over d), before the scan
    bw, cw_, dtw = _f64(n), _f64(n), _f64(d)
    rms = lambda t, w_: t / torch.sqrt(t.square().mean(-1, keepdim=True) + 1e-6) * w_  # noqa: E731
    y_rms = _mamba_ref_scan(xc, rms(delta.transpose(1, 2), dtw).transpose(1, 2), A, rms(B.transpose(1, 2), bw).transpose(1, 2),
                            rms(C.transpose(1, 2), cw_).transpose(1, 2), D, z, db)
    got = mamba_inner_fn(xz, cw, cb, xw, dw, ow, ob, A, None, None, D, delta_bias=db, b_rms_weight=bw,
                         c_rms_weight=cw_, dt_rms_weight=dtw)
    assert rel_err(got, F.linear(y_rms.transpose(1, 2), ow, ob)) < RTOL64
    # selective_scan_cuda.fwd: out before the gate, out_z after it, the last state at x[:, :, -1, 1::2]
    out, xs, out_z = selective_scan_cuda.fwd(xc, delta, A, B, C, D, z, db, True)
    ref_out, ref_state = oracle_scan(xc, delta, A, B, C, D, None, db, True, return_last_state=True)
    assert rel_err(out, ref_out) < RTOL64 and rel_err(out_z, ref_out * F.silu(z)) < RTOL64
    assert rel_err(xs[:, :, -1, 1::2], ref_state) < RTOL64


def test_split_conv1d_scan_combined_against_its_composition():
    torch.manual_seed(0)
    b, l, h, p, g, n, w = 2, 21, 4, 3, 2, 5, 4
    dim, conv_dim = h * p, h * p + 2 * g * n
    zxbcdt = _f64(b, l, 2 * dim + 2 * g * n + h)
    cw, cb, dt_bias, A, D, nw = _f64(conv_dim, w), _f64(conv_dim), _f64(h), -torch.rand(h, dtype=torch.float64) - 1, _f64(h), _f64(dim)
    z, xBC, dt = torch.split(zxbcdt, [dim, conv_dim, h], -1)
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), cw.unsqueeze(1), cb, padding=w - 1, groups=conv_dim)[..., :l]).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, g * n, g * n], -1)
    y = ssd_scan_ref(x.unflatten(-1, (h, p)), dt, A, B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n)), D=D,
                     dt_bias=dt_bias, dt_softplus=True).flatten(-2)
    gated = (y * F.silu(z)).unflatten(-1, (g, -1))
    expect = (gated / torch.sqrt(gated.square().mean(-1, keepdim=True) + 1e-6)).flatten(-2) * nw
    got = mamba_split_conv1d_scan_combined(zxbcdt, cw, cb, dt_bias, A, D, 8, rmsnorm_weight=nw, headdim=p,
                                           ngroups=g, norm_before_gate=False)
    assert rel_err(got, expect) < RTOL64
    # without the norm weight the gate is applied inside the scan
    got = mamba_split_conv1d_scan_combined(zxbcdt, cw, cb, dt_bias, A, D, 8, headdim=p, ngroups=g)
    assert rel_err(got, y * F.silu(z)) < RTOL64
    assert mamba_chunk_scan_combined is compat.ops.mamba_chunk_scan_combined


# ------------------------------------------------------------------------------------------------
# Module registration


def test_a_real_package_is_not_shadowed_unless_forced(tmp_path, monkeypatch):
    pkg = tmp_path / "causal_conv1d"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\n")
    compat.uninstall()
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "causal_conv1d"}
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "causal_conv1d" not in compat.install()
        import causal_conv1d as found

        assert getattr(found, "REAL", False) and sys.modules["mamba_ssm"].__scan_export_compat__
        assert "causal_conv1d" in compat.install(force=True)
        assert sys.modules["causal_conv1d"].causal_conv1d_fn is compat.ops.causal_conv1d_fn
        compat.uninstall()
        assert getattr(sys.modules["causal_conv1d"], "REAL", False) and "mamba_ssm" not in sys.modules
    finally:
        compat.uninstall()
        for k in [k for k in sys.modules if k.split(".")[0] == "causal_conv1d"]:
            del sys.modules[k]
        sys.modules.update(saved)
        monkeypatch.undo()
        compat.install()
    assert sys.modules["causal_conv1d"].causal_conv1d_fn is compat.ops.causal_conv1d_fn


def test_missing_module_classes_say_why():
    with pytest.raises(ImportError, match="cannot import name 'Mamba'"):
        from mamba_ssm import Mamba  # noqa: F401
    with pytest.raises(AttributeError, match="nn.Module classes"):
        sys.modules["mamba_ssm"].Mamba2  # noqa: B018


# ------------------------------------------------------------------------------------------------
# Issue 23's plain-export bugs


class Scan(nn.Module):
    """A bare scan at d_state = 1 (VMamba v2's), B and C input-dependent."""

    def __init__(self, d=8, n=1):
        super().__init__()
        self.A = nn.Parameter(-torch.rand(d, n) - 0.5)
        self.D = nn.Parameter(torch.randn(d))

    def forward(self, u, delta, B, C):
        return selective_scan_fn(u, delta, self.A, B, C, self.D, delta_softplus=True)


def _scan_args(b, l, d=8, n=1):
    return torch.randn(b, d, l), torch.randn(b, d, l) - 1, torch.randn(b, n, l), torch.randn(b, n, l)


def test_plain_export_static_then_dynamic_in_one_process_at_d_state_1():
    """First a fully static export at batch 1 (the size-1 batch and state axes that torch's
    exporter traces as symbols), then one with batch and length dynamic that the first had static:
    both used to fail (init/carry metadata; "tracing inferred a static shape of 40")."""
    torch.manual_seed(0)
    static = plain_export(Scan().eval(), _scan_args(1, 40), None)
    module = Scan().eval()
    dynamic = plain_export(module, _scan_args(2, 40), ({0: DYN, 2: DYN},) * 4)
    assert op_histogram(dynamic)["Scan"] == 1 and op_histogram(static)["Scan"] == 1
    for b, l in ((1, 1), (3, 17), (2, 90)):
        args = _scan_args(b, l)
        with torch.no_grad():
            eager = module(*args)
            u, delta, B, C = (a.double() for a in args)
            ref = oracle_scan(u, delta, module.A.double(), B, C, module.D.double(), None, None, True)
        got = run(dynamic, args)
        assert rel_err(got, eager) < RTOL and rel_err(got, ref) < RTOL, (b, l)


# ------------------------------------------------------------------------------------------------
# The eager fast path the drop-in now runs (benchmarks/eager_scan.py times it)


@pytest.mark.parametrize("layout", ["fixed", "bnl", "g1", "g2", "fixed_B", "fixed_C"])
def test_eager_sequential_scan_equals_the_oracle(layout, monkeypatch):
    """Every B/C layout, an initial state, and blocks of 3 steps (so block edges fall inside the
    sequence): equal to selective_scan_ref in float64 to summation order."""
    from scan_export.reference import selective_scan as ss

    monkeypatch.setattr(ss, "BLOCK_ELEMENTS", 3 * 2 * 8 * 3)  # 3 steps per block at b=2, d=8, n=3
    b, d, l, n = 2, 8, 13, 3
    mk = {"fixed": lambda: _f64(d, n), "bnl": lambda: _f64(b, n, l), "g1": lambda: _f64(b, 1, n, l),
          "g2": lambda: _f64(b, 2, n, l)}
    B_kind, C_kind = {"fixed": ("fixed", "fixed"), "bnl": ("bnl", "bnl"), "g1": ("g1", "g1"), "g2": ("g2", "g2"),
                      "fixed_B": ("fixed", "g2"), "fixed_C": ("bnl", "fixed")}[layout]
    B, C = mk[B_kind](), mk[C_kind]()
    u, delta, z, h0 = _f64(b, d, l), _f64(b, d, l), _f64(b, d, l), _f64(b, d, n)
    A, D, bias = -torch.rand(d, n, dtype=torch.float64), _f64(d), _f64(d)
    h0_before = h0.clone()
    with torch.no_grad():  # the drop-in's no-grad eager path is the sequential scan
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, h0)
    ref, ref_last = oracle_scan(u, delta, A, B, C, D, z, bias, True, True, h0)
    assert rel_err(out, ref) < RTOL64 and rel_err(last, ref_last) < RTOL64
    assert torch.equal(h0, h0_before)  # the scan writes its own buffers, never the caller's state
