"""Vision Mamba blocks, each exported with the plain torch.onnx.export(dynamo=True) at dynamic
batch, height and width, checked in onnxruntime against eager and against the block in float64
with the sequential references, at three image sizes other than the example's.

Our re-implementations (no upstream code), kept to what reaches the scan call:
  * VMamba SS2D, the released flag sets: v0 (mamba's selective_scan_fn, z gate: tests/test_plain_export's
    SS2D, here inside MambaIR's block, whose SS2D is VMamba's v0), v05_noz (channels-first, no z,
    VMamba's cross_scan_fn/cross_merge_fn and its selective_scan_fn with delta_bias 7th, d_state = 1
    as every released v2 model), v3 (channels-last cross scan, z gate), m0_noz (the Mamba-2 form:
    VMamba's selective_scan_chunk_fn, its argument order, one head group per direction);
  * MambaVision's mixer (non-causal 'same' convs on x and z, the scan without z, concat);
  * MambaIR's VSSBlock (LayerNorm, SS2D v0, skip scales, a conv block).
Vim's bidirectional block is tests/test_plain_export.py's BiMamba and tests/test_compat.py's VimMamba.
All blocks run on one (b, H, W, c) input, so one export covers them.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_export import selective_scan_fn
from scan_export.compat import vmamba
from scan_export.reference import selective_scan_ref
from scan_export.reference.ssd import ssd_scan_ref
from scan_export.runtime import make_session

from .conftest import rel_err
from .test_export_module import op_histogram
from .test_plain_export import SS2D, dt_proj_init, plain_export

DYN = torch.export.Dim.DYNAMIC
# float32 graph vs float32 eager and vs the float64 blocks: the project's 1e-5 parity budget.
RTOL = 1e-5
C_MODEL = 8


class SS2Dv2(nn.Module):
    """VMamba's SS2D (forward_corev2 and the m0 form) for one flag set, K = 4 directions in one scan call.

    x: (b, H, W, c) -> in_proj -> [z] -> depthwise conv2d -> silu -> cross scan (b, 4, d, L) ->
    x_proj / dt_proj per direction -> scan -> cross merge (b, d, L) -> LayerNorm [· silu(z)] -> out_proj."""

    K = 4

    def __init__(self, forward_type, d_model=C_MODEL, d_state=1, expand=2, d_conv=3, headdim=4):
        super().__init__()
        self.forward_type, self.d_state = forward_type, d_state
        self.channel_first = forward_type == "v05_noz"
        self.with_z = not forward_type.endswith("_noz")
        self.ssd = forward_type.startswith("m0")
        d, K = expand * d_model, self.K
        self.d_inner, self.dt_rank = d, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d if self.with_z else d, bias=False)
        self.conv2d = nn.Conv2d(d, d, d_conv, groups=d, padding=(d_conv - 1) // 2)
        if self.ssd:  # Mamba-2 form: per direction, d / headdim heads with scalar A, dt straight from x_proj
            self.headdim, self.nheads = headdim, d // headdim
            self.x_proj_weight = nn.Parameter(torch.randn(K, self.nheads + 2 * d_state, d) * d ** -0.5)
            self.dt_bias = nn.Parameter(torch.log(torch.expm1(torch.rand(K * self.nheads) * 0.1 + 1e-3)))
            self.A_logs = nn.Parameter(torch.log(torch.rand(K * self.nheads) * 8 + 1))
            self.Ds = nn.Parameter(torch.ones(K * self.nheads))
            self.chunk_scan = vmamba.selective_scan_chunk_fn
        else:
            self.x_proj_weight = nn.Parameter(torch.randn(K, self.dt_rank + 2 * d_state, d) * d ** -0.5)
            projs = [nn.Linear(self.dt_rank, d) for _ in range(K)]
            for p in projs:
                dt_proj_init(p, self.dt_rank)
            self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.detach() for p in projs]))  # (K, d, r)
            self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.detach() for p in projs]))  # (K, d)
            self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d, 1)
                                       + 0.3 * torch.rand(K * d, d_state))
            self.Ds = nn.Parameter(torch.ones(K * d))
            self.vmamba_scan = vmamba.selective_scan_fn
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=False)

    def core(self, x):
        """x: (b, d, H, W) -> y: (b, d, H·W)"""
        b, d, H, W = x.shape
        L, K, n = H * W, self.K, self.d_state
        if self.channel_first:
            xs = vmamba.cross_scan_fn(x, in_channel_first=True, out_channel_first=True)  # (b, K, d, L)
        else:  # channels-last in and out, as v3 runs it
            xs = vmamba.cross_scan_fn(x.permute(0, 2, 3, 1), in_channel_first=False, out_channel_first=False)
            xs = xs.permute(0, 2, 3, 1)  # (b, L, K, d) -> (b, K, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        if self.ssd:
            h, p = self.nheads, self.headdim
            dts, Bs, Cs = torch.split(x_dbl, [h, n, n], dim=2)
            y = self.chunk_scan(
                xs.reshape(b, K * h, p, L).permute(0, 3, 1, 2), dts.reshape(b, K * h, L).transpose(1, 2),
                -torch.exp(self.A_logs.float()), Bs.permute(0, 3, 1, 2), Cs.permute(0, 3, 1, 2), 16, self.Ds.float(),
                None, self.dt_bias.float(), None, None, True,  # positional: z, dt_bias, initial_states, seq_idx, dt_softplus
            )  # (b, L, K·h, p)
            ys = y.permute(0, 2, 3, 1).reshape(b, K, d, L)
        else:
            dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)
            dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
            ys = self.vmamba_scan(
                xs.reshape(b, K * d, L), dts.reshape(b, K * d, L), -torch.exp(self.A_logs.float()),
                Bs.contiguous(), Cs.contiguous(), self.Ds.float(), self.dt_projs_bias.float().reshape(-1), True,
            ).reshape(b, K, d, L)  # delta_bias the 7th positional argument, VMamba's convention
        ys = ys.unflatten(-1, (H, W))
        if self.channel_first:
            return vmamba.cross_merge_fn(ys, in_channel_first=True, out_channel_first=True)
        merged = vmamba.cross_merge_fn(ys.permute(0, 3, 4, 1, 2), in_channel_first=False, out_channel_first=False)
        return merged.transpose(1, 2)

    def forward(self, x):
        b, H, W, _ = x.shape
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1) if self.with_z else (xz, None)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        y = self.out_norm(self.core(x).transpose(1, 2)).unflatten(1, (H, W))  # (b, H, W, d)
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y)


class MambaVisionMixer(nn.Module):
    """MambaVision's mixer: x, z each half of d_inner through a non-causal ('same') depthwise conv
    and silu; the scan on x only (z=None); [y, z] concatenated; out_proj. Tokens: (b, H·W, c)."""

    def __init__(self, d_model=C_MODEL, d_state=4, d_conv=3, expand=2):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = expand * d_model, d_state, math.ceil(d_model / 16)
        half = self.d_inner // 2
        self.in_proj = nn.Linear(d_model, self.d_inner)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half)
        dt_proj_init(self.dt_proj, self.dt_rank)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(half, 1)))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(self.d_inner, d_model)
        self.selective_scan = selective_scan_fn

    def forward(self, hidden_states):
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, d_inner, l)
        x, z = xz.chunk(2, dim=1)
        A = -torch.exp(self.A_log.float())
        x = F.silu(F.conv1d(x, self.conv1d_x.weight, padding="same", groups=self.d_inner // 2))
        z = F.silu(F.conv1d(z, self.conv1d_z.weight, padding="same", groups=self.d_inner // 2))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, l, r + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b, half, l)
        y = self.selective_scan(x, dt, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                                self.D.float(), z=None, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        assert y.shape[-1] == seqlen
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


class MambaIRBlock(nn.Module):
    """MambaIR's VSSBlock: x·skip + SS2D(LN(x)), then ·skip2 + conv block(LN(·)), channels-last."""

    def __init__(self, d_model=C_MODEL, d_state=4):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attention = SS2D(d_model=d_model, d_state=d_state)
        self.skip_scale, self.skip_scale2 = nn.Parameter(torch.ones(d_model)), nn.Parameter(torch.ones(d_model))
        self.conv_blk = nn.Sequential(nn.Conv2d(d_model, d_model, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(d_model, d_model, 3, padding=1))

    def forward(self, x):
        x = x * self.skip_scale + self.self_attention(self.ln_1(x))
        return x * self.skip_scale2 + self.conv_blk(self.ln_2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Zoo(nn.Module):
    NAMES = ("v05_noz", "v3", "m0_noz", "mambavision", "mambair")

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "v05_noz": SS2Dv2("v05_noz", d_state=1),
            "v3": SS2Dv2("v3", d_state=4), "m0_noz": SS2Dv2("m0_noz", d_state=1),
            "mambavision": MambaVisionMixer(), "mambair": MambaIRBlock(),
        })

    def forward(self, x):
        out = []
        for name in self.NAMES:
            if name == "mambavision":
                out.append(self.blocks[name](x.flatten(1, 2)).unflatten(1, x.shape[1:3]))
            else:
                out.append(self.blocks[name](x))
        return tuple(out)


def _ref_vmamba_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, oflex=True, backend=None):
    return selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus)


def _ref_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                    dt_softplus=False, *rest, **kw):
    return ssd_scan_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                        seq_idx=seq_idx, dt_softplus=dt_softplus)


def float64_oracle(module):
    """The zoo in float64 with every scan swapped for the sequential references."""
    oracle = copy.deepcopy(module).double()
    for m in oracle.modules():
        if hasattr(m, "selective_scan"):
            m.selective_scan = selective_scan_ref
        if hasattr(m, "vmamba_scan"):
            m.vmamba_scan = _ref_vmamba_scan
        if hasattr(m, "chunk_scan"):
            m.chunk_scan = _ref_chunk_scan
    return oracle


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    module = Zoo().eval()
    model = plain_export(module, (torch.randn(2, 4, 6, C_MODEL),), ({0: DYN, 1: DYN, 2: DYN},))
    return module, model


def test_vision_blocks_export_plainly_at_dynamic_batch_height_width(zoo):
    module, model = zoo
    assert op_histogram(model)["Scan"] == len(Zoo.NAMES) and op_histogram(model)["Loop"] == 0  # one per block
    session = make_session(model.SerializeToString(), "cpu")
    oracle = float64_oracle(module)
    for b, H, W in ((1, 5, 3), (3, 7, 9), (2, 1, 8)):  # none is the example's (2, 4, 6); H = 1 included
        torch.manual_seed(b + H * W)
        x = torch.randn(b, H, W, C_MODEL)
        got = session.run(None, {model.graph.input[0].name: x.numpy()})
        with torch.no_grad():
            eager = module(x)
            ref = oracle(x.double())
        for name, g, e, r in zip(Zoo.NAMES, got, eager, ref):
            assert g.shape == (b, H, W, C_MODEL), name
            assert rel_err(g, e) < RTOL and rel_err(g, r) < RTOL, (name, b, H, W)


def test_vmamba_adapters_are_vmamba_conventions():
    """delta_bias 7th and oflex; the chunk scan's positional dt_softplus; cross scan then merge is
    the sum of the four directions' inverses (x·4 for scans=0 when y = xs)."""
    torch.manual_seed(0)
    u, dt = torch.randn(2, 8, 10, dtype=torch.float64), torch.randn(2, 8, 10, dtype=torch.float64)
    A, B, C = -torch.rand(8, 2, dtype=torch.float64), torch.randn(2, 4, 2, 10, dtype=torch.float64), torch.randn(2, 4, 2, 10, dtype=torch.float64)
    D, bias = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    out = vmamba.selective_scan_fn(u, dt, A, B, C, D, bias, True, oflex=False)
    assert rel_err(out, selective_scan_ref(u, dt, A, B, C, D, None, bias, True)) < 1e-12
    assert vmamba.selective_scan_fn(u.float(), dt.float(), A.float(), B.float(), C.float(), oflex=True).dtype == torch.float32
    x = torch.randn(2, 3, 5, 4)
    for scans, copies in ((0, 4), (1, 4), (2, 4)):
        xs = vmamba.cross_scan_fn(x, scans=scans)
        assert xs.shape == (2, 4, 3, 20)
        merged = vmamba.cross_merge_fn(xs.unflatten(-1, (5, 4)), scans=scans)
        assert torch.allclose(merged, copies * x.flatten(2)), scans
    last = vmamba.cross_scan_fn(x.permute(0, 2, 3, 1), in_channel_first=False, out_channel_first=False)
    assert torch.equal(last.permute(0, 2, 3, 1), vmamba.cross_scan_fn(x))


def test_docs_vision_md_code_runs():
    """docs/vision.md's code blocks, run as written (the export recipe with its own checks)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "vision.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2 and "torch.onnx.export" in blocks[1]
    torch.manual_seed(0)
    namespace = {"__name__": "docs_vision"}
    exec(compile("\n".join(blocks), "docs/vision.md", "exec"), namespace)  # noqa: S102
    assert namespace["program"].model_proto.graph.node  # the export ran
