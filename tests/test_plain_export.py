"""Modules calling our drop-ins export with a PLAIN torch.onnx.export(module, args, dynamo=True,
dynamic_shapes=...), nothing else: a checked graph that onnxruntime runs at lengths other than the
example's, never unrolled, and equal to our wrapper's (scan_export.onnx.export) and to float64.

The blocks follow their sources' layouts (mamba_ssm's Mamba and Mamba2, VMamba's SS2D, Vim's
bidirectional Mamba), written here without einops; each calls its scan through an attribute, as
VMamba does, so the float64 oracle can swap in the sequential references.
"""

import copy
import math

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_export import mamba_chunk_scan_combined, selective_scan_fn
from scan_export.onnx.export import export
from scan_export.reference import selective_scan_ref
from scan_export.reference.custom_ops import causal_conv, exporting_plainly
from scan_export.reference.ssd import ssd_scan_ref
from scan_export.runtime import make_session

from .conftest import rel_err
from .test_export_module import op_histogram

DYN = torch.export.Dim.DYNAMIC
# float32 graphs against float32 eager, our wrapper's graph and the float64 block: 1e-5 relative is
# the project's parity budget. Measured worst over these blocks and lengths: 3.0e-7 vs eager (eager
# scans in chunks, the graph step by step: two rounding orders) and vs float64; vs the wrapper's
# graph 0 (the same arithmetic), but 1.6e-7 for Mamba-2 at l = 1 (a 1x1 chunk vs the wrapper's one step).
RTOL = 1e-5


def dt_proj_init(dt_proj: nn.Linear, dt_rank: int, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4):
    """mamba_ssm's dt_proj init: weight U(±dt_rank^-0.5); bias = softplus⁻¹(dt), dt log-uniform in
    [dt_min, dt_max], so Δ starts in [1e-3, 0.1], where a plain Log(1 + t) softplus loses digits."""
    std = dt_rank ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class Mamba(nn.Module):
    """mamba_ssm.modules.mamba_simple.Mamba, the reference (non-fused) path of forward.

    hidden_states: (b, l, d_model) -> in_proj -> causal depthwise conv1d -> x_proj -> dt_proj ->
    selective_scan_fn(delta_bias = dt_proj.bias, softplus) gated by z -> out_proj."""

    def __init__(self, d_model=16, d_state=8, d_conv=4, expand=2):
        super().__init__()
        self.d_state, self.d_inner = d_state, expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._ssm_params(d_conv)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.selective_scan = selective_scan_fn

    def _ssm_params(self, d_conv):
        conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        dt_proj_init(dt_proj, self.dt_rank)
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # S4D-real
        return conv1d, x_proj, dt_proj, nn.Parameter(torch.log(A)), nn.Parameter(torch.ones(self.d_inner))

    def ssm(self, xz, conv1d, x_proj, dt_proj, A_log, D):
        """xz: (b, 2·d_inner, l) -> y: (b, d_inner, l)"""
        seqlen = xz.shape[-1]
        A = -torch.exp(A_log.float())
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv1d(x)[..., :seqlen])
        x_dbl = x_proj(x.transpose(1, 2))  # (b, l, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)  # (b, d_inner, l), bias added by the scan
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, n, l)
        return self.selective_scan(x, dt, A, B, C, D.float(), z=z, delta_bias=dt_proj.bias.float(),
                                   delta_softplus=True)

    def forward(self, hidden_states):
        xz = self.in_proj(hidden_states).transpose(1, 2)
        y = self.ssm(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        return self.out_proj(y.transpose(1, 2))


class BiMamba(Mamba):
    """Vim's bimamba (v2): the same mixer run forward and over the flipped sequence with its own
    conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b; the two outputs averaged (if_devide_out)."""

    def __init__(self, d_model=16, d_state=8, d_conv=4, expand=2):
        super().__init__(d_model, d_state, d_conv, expand)
        self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._ssm_params(d_conv)

    def forward(self, hidden_states):
        xz = self.in_proj(hidden_states).transpose(1, 2)
        out = self.ssm(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        out_b = self.ssm(xz.flip([-1]), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        return self.out_proj(((out + out_b.flip([-1])) / 2).transpose(1, 2))


class SS2D(nn.Module):
    """VMamba's SS2D: four scans over an image (row-major, column-major, both reversed), batched as
    K = 4 groups in ONE selective_scan_fn call, u: (b, K·d, H·W), B, C: (b, K, n, H·W).

    x: (b, H, W, d_model) -> in_proj -> depthwise conv2d -> cross scan -> merge -> LayerNorm ·
    silu(z) -> out_proj."""

    K = 4

    def __init__(self, d_model=8, d_state=4, d_conv=3, expand=2):
        super().__init__()
        self.d_state, self.d_inner = d_state, expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        d, K = self.d_inner, self.K
        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.conv2d = nn.Conv2d(d, d, d_conv, groups=d, padding=(d_conv - 1) // 2)
        self.x_proj_weight = nn.Parameter(torch.randn(K, self.dt_rank + 2 * d_state, d) * d ** -0.5)
        dt_projs = [nn.Linear(self.dt_rank, d) for _ in range(K)]
        for p in dt_projs:
            dt_proj_init(p, self.dt_rank)
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.detach() for p in dt_projs]))  # (K, d, r)
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.detach() for p in dt_projs]))  # (K, d)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d, 1))
        self.Ds = nn.Parameter(torch.ones(K * d))
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=False)
        self.selective_scan = selective_scan_fn

    def forward_core(self, x):
        """x: (b, d, H, W) -> the four directions' outputs, each (b, d, H·W) in row-major order."""
        b, d, H, W = x.shape
        L, K = H * W, self.K
        x_hwwh = torch.stack([x.reshape(b, d, L), x.transpose(2, 3).reshape(b, d, L)], dim=1)  # (b, 2, d, L)
        xs = torch.cat([x_hwwh, x_hwwh.flip([-1])], dim=1)  # (b, K, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        out_y = self.selective_scan(
            xs.reshape(b, K * d, L), dts.reshape(b, K * d, L), -torch.exp(self.A_logs.float()),
            Bs.contiguous(), Cs.contiguous(), self.Ds.float(), z=None,
            delta_bias=self.dt_projs_bias.float().reshape(-1), delta_softplus=True,
        ).reshape(b, K, d, L)
        inv_y = out_y[:, 2:4].flip([-1])
        wh_y = out_y[:, 1].reshape(b, d, W, H).transpose(2, 3).reshape(b, d, L)
        invwh_y = inv_y[:, 1].reshape(b, d, W, H).transpose(2, 3).reshape(b, d, L)
        return out_y[:, 0], inv_y[:, 0], wh_y, invwh_y

    def forward(self, x):
        b, H, W, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        y = sum(self.forward_core(x))  # (b, d, L)
        y = self.out_norm(y.transpose(1, 2).reshape(b, H, W, -1))
        return self.out_proj(y * F.silu(z))


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMSNorm with norm_before_gate=False: (y·silu(z)) normalized per group."""

    def __init__(self, d, group_size, eps=1e-5):
        super().__init__()
        self.weight, self.group_size, self.eps = nn.Parameter(torch.ones(d)), group_size, eps

    def forward(self, x, z):
        x = (x * F.silu(z)).unflatten(-1, (-1, self.group_size))
        return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight


class Mamba2(nn.Module):
    """mamba_ssm.modules.mamba2.Mamba2, the non-fused path, without seq_idx: in_proj -> [z, xBC, dt]
    -> causal conv over xBC (our causal_conv op, in causal_conv1d_fn's place) -> silu ->
    mamba_chunk_scan_combined(D, z=None, dt_bias, dt_softplus) -> gated RMSNorm -> out_proj.
    chunk_size 16 (mamba_ssm's default is 256) so that short test lengths cross chunks."""

    def __init__(self, d_model=16, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=16):
        super().__init__()
        self.d_state, self.d_conv, self.headdim, self.ngroups = d_state, d_conv, headdim, ngroups
        self.d_inner, self.chunk_size = expand * d_model, chunk_size
        self.nheads = self.d_inner // headdim
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNormGated(self.d_inner, self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.chunk_scan = mamba_chunk_scan_combined

    def forward(self, u):
        b, seqlen, _ = u.shape
        A = -torch.exp(self.A_log.float())
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        conv_state = xBC.new_zeros(b, self.d_conv - 1, xBC.shape[-1])  # a fresh sequence
        xBC, _ = causal_conv(xBC, conv_state, self.conv1d.weight, self.conv1d.bias)
        x, B, C = torch.split(F.silu(xBC), [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = self.chunk_scan(
            x.unflatten(-1, (-1, self.headdim)), dt, A, B.unflatten(-1, (self.ngroups, -1)),
            C.unflatten(-1, (self.ngroups, -1)), chunk_size=self.chunk_size, D=self.D, z=None,
            dt_bias=self.dt_bias, dt_softplus=True,
        )
        return self.out_proj(self.norm(y.flatten(-2), z))


def _seq(b, l, d=16):
    return (torch.randn(b, l, d),)


# name: (module factory, example input maker, dynamic_shapes, the two example sizes, three check sizes,
# also export with our wrapper and compare). BiMamba's scans are Mamba's (same layout, same op): its
# wrapper export would add a minute of export time (this machine) and no coverage.
CASES = {
    "mamba": (Mamba, _seq, ({0: DYN, 1: DYN},), (8, 40), (1, 17, 100), True),
    "bimamba": (BiMamba, _seq, ({0: DYN, 1: DYN},), (8, 40), (1, 17, 100), False),
    "ss2d": (SS2D, lambda b, hw: (torch.randn(b, *hw, 8),), ({0: DYN, 1: DYN, 2: DYN},),
             ((4, 6), (7, 5)), ((3, 9), (6, 4), (1, 5)), True),
    "mamba2": (Mamba2, _seq, ({0: DYN, 1: DYN},), (8, 40), (1, 17, 100), True),
}


def plain_export(module, args, dynamic_shapes) -> onnx.ModelProto:
    """The user's call, verbatim: no translation table, no options."""
    return torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes).model_proto


def run(model: onnx.ModelProto, args):
    session = make_session(model.SerializeToString(), "cpu")
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]


def float64_oracle(module):
    """The block in float64 with the sequential references in place of our drop-ins."""
    oracle = copy.deepcopy(module).double()
    if hasattr(oracle, "selective_scan"):
        oracle.selective_scan = selective_scan_ref
    if hasattr(oracle, "chunk_scan"):
        oracle.chunk_scan = ssd_scan_ref
    return oracle


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request):
    factory, make, dynamic_shapes, example_sizes, check_sizes, with_wrapper = CASES[request.param]
    torch.manual_seed(0)
    module = factory().eval()
    plain = {size: plain_export(module, make(2, size), dynamic_shapes) for size in example_sizes}
    wrapper = export(module, make(2, example_sizes[0]), dynamic_shapes=dynamic_shapes) if with_wrapper else None
    return module, make, plain[example_sizes[0]], plain, wrapper, check_sizes


def test_plain_export_is_one_loop_whatever_the_example_size(exported):
    _, _, model, plain, _, _ = exported
    onnx.checker.check_model(model, full_check=True)
    first, second = (op_histogram(m) for m in plain.values())
    assert first == second  # nothing unrolled: the graph does not depend on the example's length
    scans = 2 if isinstance(exported[0], BiMamba) else 1
    assert first["Scan"] == scans and first["Loop"] == 0
    assert all(o.domain in ("", "ai.onnx") for o in model.opset_import)  # no custom node left


def test_plain_export_matches_eager_wrapper_and_float64(exported):
    module, make, model, _, wrapper, check_sizes = exported
    oracle = float64_oracle(module)
    for size in check_sizes:
        torch.manual_seed(1)
        args = make(3, size)
        got = run(model, args)
        with torch.no_grad():
            eager = module(*args)
            reference = oracle(*(a.double() for a in args))
        assert rel_err(got, eager) < RTOL, size
        if wrapper is not None:
            assert rel_err(got, run(wrapper, args)) < RTOL, size
        assert rel_err(got, reference) < RTOL, size


def test_fixed_B_C_initial_and_last_state():
    """Fixed (d, n) B and C, an initial state in and the last state out: the plain route against
    float64 and against our wrapper's chunked form. That graph has the lowering's Loop, which the
    plain route never emits: the wrapper's export still takes the custom op (opaque_ops works)."""
    assert not exporting_plainly()  # eager calls take the eager paths (custom op, or the no-grad scan)

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(-torch.rand(6, 3))
            self.B, self.C = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(6, 3))

        def forward(self, u, delta, h0):
            return selective_scan_fn(u, delta, self.A, self.B, self.C, delta_softplus=True,
                                     return_last_state=True, initial_state=h0)

    m = Fixed().eval()
    ds = ({0: DYN, 2: DYN}, {0: DYN, 2: DYN}, {0: DYN})
    example = lambda l: (torch.randn(2, 6, l), torch.randn(2, 6, l), torch.randn(2, 6, 3))  # noqa: E731
    models = [plain_export(m, example(l), ds) for l in (9, 33)]
    assert op_histogram(models[0]) == op_histogram(models[1]) and op_histogram(models[0])["Scan"] == 1
    chunked = export(m, example(9), dynamic_shapes=ds, scan_form="chunked")
    assert op_histogram(chunked)["Loop"] == 1 and op_histogram(chunked)["Scan"] == 0
    plain, wrapper = (make_session(x.SerializeToString(), "cpu") for x in (models[0], chunked))
    for l in (1, 17, 100):
        args = (torch.randn(3, 6, l), torch.randn(3, 6, l), torch.randn(3, 6, 3))
        feeds = dict(zip([i.name for i in plain.get_inputs()], (a.numpy() for a in args)))
        (out, state), (w_out, w_state) = plain.run(None, feeds), wrapper.run(None, feeds)
        u, delta, h0 = (a.double() for a in args)
        ref, ref_state = selective_scan_ref(u, delta, m.A.double(), m.B.double(), m.C.double(),
                                            delta_softplus=True, return_last_state=True, initial_state=h0)
        assert rel_err(out, ref) < RTOL and rel_err(state, ref_state) < RTOL, l
        assert rel_err(out, w_out) < RTOL and rel_err(state, w_state) < RTOL, l
