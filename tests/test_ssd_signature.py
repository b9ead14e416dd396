"""mamba_chunk_scan_combined's full signature (mamba_ssm's semantics, reference/ssd.py's docstring):
seq_idx packing, cu_seqlens + return_varlen_states, state_dtype, dt_limit, the return conventions,
in eager and, for seq_idx, in ONNX; and a Mamba-2 block on a packed batch."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scan_export import mamba_chunk_scan_combined
from scan_export.errors import ScanExportError
from scan_export.onnx.export import export
from scan_export.reference.regimes import REGIMES, make_ssd_inputs
from scan_export.reference.ssd import ssd_scan_chunked, ssd_scan_ref
from scan_export.runtime import make_session

from .conftest import rel_err, to64

# float32 chunked against the float64 sequential oracle: measured ≤ 3e-7 (README); 1e-5 is the budget.
RTOL = 1e-5
T = 16
SEQ_FIELDS = ("x", "dt", "B", "C", "z")


def packed_seq_idx(lengths_per_row):
    """Rows of sequence lengths -> seq_idx (b, l) int32, ids 0, 1, 2, … along each row."""
    rows = [torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(row)]) for row in lengths_per_row]
    assert len({len(r) for r in rows}) == 1
    return torch.stack(rows)


# 2-4 sequences per row; starts inside chunks (30, 37, 50, …) and exactly on chunk edges (16, 32, 64, 80).
PACKINGS = [[30, 34, 36], [16, 48, 36], [32, 32, 16, 20], [64, 36], [7, 9, 80, 4]]


def alone(kw, row, start, stop, first):
    """One packed sequence run by itself (float64 oracle): the first of a row keeps initial_states."""
    sub = {k: (v[row:row + 1, start:stop] if k in SEQ_FIELDS and v is not None else v) for k, v in kw.items()}
    sub["initial_states"] = kw["initial_states"][row:row + 1] if first and kw["initial_states"] is not None else None
    return ssd_scan_ref(**sub, return_final_states=True)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("d_per_channel,with_z", [(False, False), (True, True)])
def test_seq_idx_matches_each_sequence_run_alone(regime, d_per_channel, with_z):
    rows = [PACKINGS[0], PACKINGS[2], PACKINGS[4]]
    seq_idx = packed_seq_idx(rows)
    kw = make_ssd_inputs(regime, 3, 100, 4, 8, 2, d_per_channel=d_per_channel, with_z=with_z,
                         with_initial_states=True, seed=len(regime))
    ref, ref_final = ssd_scan_ref(**to64(kw), seq_idx=seq_idx, return_final_states=True)
    # The oracle's resets are the packing: each sequence alone gives the same outputs (float64, ~1e-16).
    for r, lengths in enumerate(rows):
        starts = np.cumsum([0, *lengths])
        for i, (s, e) in enumerate(zip(starts, starts[1:])):
            y_alone, final_alone = alone(to64(kw), r, s, e, first=i == 0)
            torch.testing.assert_close(ref[r:r + 1, s:e], y_alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref_final[r:r + 1], final_alone, rtol=1e-12, atol=1e-12)
    for chunk_size in (T, 64):  # edges at 16, 32, 48, 64, 80 fall on chunk edges for T = 16 only
        for impl in (ssd_scan_chunked, mamba_chunk_scan_combined):
            y, final = impl(**kw, chunk_size=chunk_size, seq_idx=seq_idx, return_final_states=True)
            assert rel_err(y, ref) < RTOL and rel_err(final, ref_final) < RTOL


def test_seq_idx_not_starting_at_zero_drops_initial_states():
    """mamba's kernels compare with id 0 before position 0: initial_states belongs to sequence 0."""
    kw = make_ssd_inputs("init", 1, 40, 4, 8, 2, with_initial_states=True)
    seq_idx = torch.full((1, 40), 3, dtype=torch.int32)
    y = mamba_chunk_scan_combined(**kw, chunk_size=T, seq_idx=seq_idx)
    want = ssd_scan_ref(**to64({**kw, "initial_states": None}))
    assert rel_err(y, want) < RTOL


def test_seq_idx_gradients_match_reference():
    kw = make_ssd_inputs("init", 2, 50, 4, 8, 2, with_initial_states=True, with_z=True, seed=6)
    seq_idx = packed_seq_idx([[16, 34], [20, 11, 19]])
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    leaves = {k: kw[k].clone().requires_grad_(True) for k in names}
    y, s = mamba_chunk_scan_combined(**{**kw, **leaves}, chunk_size=T, seq_idx=seq_idx, return_final_states=True)
    (y.sum() + s.square().sum()).backward()
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    ry, rs = ssd_scan_ref(**{**to64(kw), **ref_leaves}, seq_idx=seq_idx, return_final_states=True)
    (ry.sum() + rs.square().sum()).backward()
    for k in names:  # mamba_ssm's fp32 gradient tolerances
        torch.testing.assert_close(leaves[k].grad.double(), ref_leaves[k].grad, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("lengths", [PACKINGS[0], PACKINGS[1], PACKINGS[4]])
def test_varlen_states_are_each_sequence_final_state(regime, lengths):
    kw = make_ssd_inputs(regime, 1, 100, 4, 8, 2, with_initial_states=True, seed=len(lengths))
    seq_idx = packed_seq_idx([lengths])
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
    y, final, varlen = mamba_chunk_scan_combined(**kw, chunk_size=T, seq_idx=seq_idx, cu_seqlens=cu,
                                                 return_final_states=True, return_varlen_states=True)
    ref_y, ref_varlen = ssd_scan_ref(**to64(kw), chunk_size=T, seq_idx=seq_idx, cu_seqlens=cu,
                                     return_varlen_states=True)
    assert varlen.shape == (len(lengths), 4, 8, 16) and varlen.dtype == torch.float32
    assert rel_err(varlen, ref_varlen) < RTOL and rel_err(y, ref_y) < RTOL
    torch.testing.assert_close(final, varlen[-1:], rtol=0, atol=0)  # the last sequence ends the row
    for i, (s, e) in enumerate(zip(cu.tolist(), cu[1:].tolist())):
        # with a matching seq_idx: the sequence's own final state, except mamba's quirk that a first
        # sequence ending in chunk 0 does not see initial_states (the kernel adds no entering state there)
        keeps_initial = i == 0 and e - 1 >= T
        _, final_alone = alone(to64(kw), 0, s, e, first=keeps_initial)
        assert rel_err(varlen[i:i + 1], final_alone) < RTOL, i


def test_varlen_states_without_seq_idx_follow_mamba_chunk_formula():
    """Without seq_idx the state entering a chunk still carries earlier sequences (mamba's chunk_state_varlen)."""
    kw = make_ssd_inputs("easy", 1, 100, 4, 8, 2, seed=1)
    cu = torch.tensor([0, 30, 64, 100])
    _, varlen = ssd_scan_chunked(**kw, chunk_size=T, cu_seqlens=cu, return_varlen_states=True)
    _, want = ssd_scan_ref(**to64(kw), chunk_size=T, cu_seqlens=cu, return_varlen_states=True)
    assert rel_err(varlen, want) < RTOL
    _, own = alone(to64(kw), 0, 30, 64, first=False)  # sequence 1 started at 30, inside chunk 1
    assert rel_err(varlen[1:2], own) > 1e-3  # it leaks: the chunk-3 entering state holds sequence 0


@pytest.mark.parametrize("final,varlen", list(itertools.product([False, True], repeat=2)))
def test_return_conventions(final, varlen):
    kw = make_ssd_inputs("easy", 1, 40, 4, 8, 2)
    out = mamba_chunk_scan_combined(**kw, chunk_size=T, cu_seqlens=torch.tensor([0, 25, 40]),
                                    return_final_states=final, return_varlen_states=varlen)
    # mamba: out | (out, final) | (out, varlen) | (out, final, varlen)
    parts = out if isinstance(out, tuple) else (out,)
    assert len(parts) == 1 + final + varlen
    assert parts[0].shape == (1, 40, 4, 8)
    if varlen:
        assert parts[-1].shape == (2, 4, 8, 16)


@pytest.mark.parametrize("state_dtype", [None, torch.float32, torch.float64])
def test_state_dtype(state_dtype):
    kw = make_ssd_inputs("init", 1, 70, 4, 8, 2, with_initial_states=True)
    seq_idx = packed_seq_idx([[40, 30]])
    cu = torch.tensor([0, 40, 70])
    y, final, varlen = mamba_chunk_scan_combined(**kw, chunk_size=T, seq_idx=seq_idx, cu_seqlens=cu,
                                                 return_final_states=True, return_varlen_states=True,
                                                 state_dtype=state_dtype)
    y2, final2 = mamba_chunk_scan_combined(**kw, chunk_size=T, seq_idx=seq_idx, return_final_states=True,
                                           state_dtype=state_dtype)
    want_dtype = state_dtype or torch.float32  # mamba: state_dtype, else C's dtype
    assert final.dtype == varlen.dtype == final2.dtype == want_dtype
    ref_y, ref_final, ref_varlen = ssd_scan_ref(**to64(kw), chunk_size=T, seq_idx=seq_idx, cu_seqlens=cu,
                                                return_final_states=True, return_varlen_states=True)
    for got, want in ((y, ref_y), (y2, ref_y), (final, ref_final), (final2, ref_final), (varlen, ref_varlen)):
        assert rel_err(got, want) < RTOL


def test_narrow_state_dtype_rounds_the_states_between_chunks():
    """float16 stored states (mamba's fp16 models): the next chunk reads them rounded, the returned
    states are float16; the running state is not rounded, so errors stay at float16's ~5e-4."""
    kw = make_ssd_inputs("init", 2, 70, 4, 8, 2, with_initial_states=True)
    y16, final16 = mamba_chunk_scan_combined(**kw, chunk_size=T, return_final_states=True, state_dtype=torch.float16)
    y32 = mamba_chunk_scan_combined(**kw, chunk_size=T)
    ref_y, ref_final = ssd_scan_ref(**to64(kw), return_final_states=True)
    assert final16.dtype == torch.float16
    assert 1e-7 < rel_err(y16, y32) < 2e-3  # rounding happened, and only by float16's precision
    assert rel_err(final16, ref_final) < 1e-3


def test_dt_limit_and_the_default_clamp_at_zero():
    """mamba's kernel clamps Δ to dt_limit always: without softplus a negative dt counts as 0."""
    kw = make_ssd_inputs("easy", 2, 40, 4, 8, 2, dt_softplus=False, with_dt_bias=False)
    kw["dt"] = kw["dt"] - 0.1  # some steps negative
    assert (kw["dt"] < 0).any()
    y = mamba_chunk_scan_combined(**kw, chunk_size=T)
    want = ssd_scan_ref(**to64({**kw, "dt": kw["dt"].clamp(min=0)}))
    assert rel_err(y, want) < RTOL
    y = mamba_chunk_scan_combined(**kw, chunk_size=T, dt_limit=(0.02, 0.3))
    want = ssd_scan_ref(**to64({**kw, "dt": kw["dt"].clamp(0.02, 0.3)}))
    assert rel_err(y, want) < RTOL


def test_bad_arguments_are_named():
    kw = make_ssd_inputs("easy", 2, 10, 4, 8, 2)
    with pytest.raises(ScanExportError, match="cu_seqlens .* needs batch 1"):
        mamba_chunk_scan_combined(**kw, cu_seqlens=torch.tensor([0, 10]), return_varlen_states=True)
    kw1 = make_ssd_inputs("easy", 1, 10, 4, 8, 2)
    with pytest.raises(ScanExportError, match=r"cu_seqlens must rise strictly from 0 to at most seqlen=10, got \[0, 5, 5, 10\]"):
        mamba_chunk_scan_combined(**kw1, cu_seqlens=torch.tensor([0, 5, 5, 10]), return_varlen_states=True)
    with pytest.raises(ScanExportError, match="return_varlen_states needs cu_seqlens"):
        mamba_chunk_scan_combined(**kw1, return_varlen_states=True)
    with pytest.raises(ScanExportError, match="seq_idx must be an integer tensor"):
        mamba_chunk_scan_combined(**kw1, seq_idx=torch.zeros(1, 10))


# ------------------------------------------------------------------------------------------------
# ONNX: seq_idx is an input of the exported scan

DYN = torch.export.Dim.DYNAMIC


class PackedScan(torch.nn.Module):
    def __init__(self, state_dtype=None):
        super().__init__()
        kw = make_ssd_inputs("init", 1, 1, 4, 8, 2, d_per_channel=True)
        self.A, self.D, self.dt_bias = (torch.nn.Parameter(kw[k]) for k in ("A", "D", "dt_bias"))
        self.state_dtype = state_dtype

    def forward(self, x, dt, B, C, z, h0, seq_idx):
        return mamba_chunk_scan_combined(x, dt, self.A, B, C, T, D=self.D, z=z, dt_bias=self.dt_bias,
                                         initial_states=h0, seq_idx=seq_idx, dt_softplus=True,
                                         return_final_states=True, state_dtype=self.state_dtype)


def _export_packed(module):
    names = ["x", "dt", "B", "C", "z", "h0", "seq_idx"]
    kw = make_ssd_inputs("init", 2, 20, 4, 8, 2, with_z=True, with_initial_states=True)
    args = (kw["x"], kw["dt"], kw["B"], kw["C"], kw["z"], kw["initial_states"], torch.zeros(2, 20, dtype=torch.int32))
    bl = {0: DYN, 1: DYN}
    model = export(module, args, dynamic_shapes=(bl, bl, bl, bl, bl, {0: DYN}, bl), input_names=names)
    return make_session(model.SerializeToString(), "cpu"), names


@pytest.fixture(scope="module")
def packed_session():
    torch.manual_seed(0)
    module = PackedScan().eval()
    return module, *_export_packed(module)


@pytest.mark.parametrize("lengths", [[1], [5], [30, 34, 36], [16, 48, 36], [7, 9, 80, 4], [64, 64, 1]])
def test_onnx_seq_idx_input_matches_reference(packed_session, lengths):
    module, session, names = packed_session
    l = sum(lengths)
    kw = make_ssd_inputs("init", 2, l, 4, 8, 2, with_z=True, with_initial_states=True, seed=l)
    seq_idx = packed_seq_idx([lengths, lengths[::-1]])
    feeds = dict(zip(names, (kw["x"], kw["dt"], kw["B"], kw["C"], kw["z"], kw["initial_states"], seq_idx)))
    y, final = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    ref_kw = {**to64(kw), "A": module.A.detach().double(), "D": module.D.detach().double(),
              "dt_bias": module.dt_bias.detach().double()}
    ref_y, ref_final = ssd_scan_ref(**ref_kw, seq_idx=seq_idx, return_final_states=True)
    assert rel_err(y, ref_y) < RTOL and rel_err(final, ref_final) < RTOL


def test_onnx_narrow_state_dtype_rounds_as_eager():
    module = PackedScan(state_dtype=torch.float16).eval()
    session, names = _export_packed(module)
    kw = make_ssd_inputs("init", 2, 70, 4, 8, 2, with_z=True, with_initial_states=True, seed=3)
    args = (kw["x"], kw["dt"], kw["B"], kw["C"], kw["z"], kw["initial_states"], packed_seq_idx([[40, 30], [70]]))
    y, final = session.run(None, {k: v.numpy() for k, v in zip(names, args)})
    with torch.no_grad():
        eager_y, eager_final = module(*args)
    assert final.dtype == np.float16
    # Same roundings at the same chunk edges; what differs is float32 summation order.
    assert rel_err(y, eager_y) < RTOL and rel_err(final.astype(np.float32), eager_final.float()) < 1e-3


def test_onnx_refuses_varlen_states_and_native_seq_idx():
    class Varlen(PackedScan):
        def forward(self, x, dt, B, C, z, h0, seq_idx):
            return mamba_chunk_scan_combined(x, dt, self.A, B, C, T, cu_seqlens=torch.tensor([0, 20]),
                                             return_varlen_states=True)[1]

    with pytest.raises(Exception) as err:  # torch.onnx wraps what torch.export raised; ours is the cause
        _export_packed(Varlen().eval())
    cause = err.value
    while cause is not None and not isinstance(cause, ScanExportError):
        cause = cause.__cause__
    assert cause is not None and "return_varlen_states is not supported in ONNX export" in str(cause)
    from scan_export.onnx.lowering.graph_builder import GraphBuilder
    from scan_export.onnx.lowering.ssd import SSDConfig, emit_ssd_scan

    with pytest.raises(ScanExportError, match="native lowering .* takes neither seq_idx"):
        emit_ssd_scan(GraphBuilder("t"), SSDConfig(lowering="native", heads=4), "x", "dt", "A", "B", "C", seq_idx="s")


# ------------------------------------------------------------------------------------------------
# A Mamba-2 block with mamba_ssm's Mamba2 layout on a packed batch


class PackedMamba2(torch.nn.Module):
    """mamba_ssm.modules.mamba2.Mamba2.forward's non-fused path with seq_idx (d_mlp = 0, rmsnorm,
    norm_before_gate=False): in_proj -> [z, xBC, dt]; causal depthwise conv over xBC that, like
    causal_conv1d_fn(seq_idx=...), never reads across a sequence start; silu; x, B, C;
    mamba_chunk_scan_combined(..., seq_idx); gated RMSNorm per group; out_proj."""

    def __init__(self, d_model=16, headdim=8, nheads=4, ngroups=2, d_state=8, d_conv=4, chunk_size=16):
        super().__init__()
        self.p, self.h, self.g, self.n, self.k, self.chunk = headdim, nheads, ngroups, d_state, d_conv, chunk_size
        self.d_ssm = nheads * headdim
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.in_proj = torch.nn.Linear(d_model, 2 * self.d_ssm + 2 * ngroups * d_state + nheads, bias=False)
        self.conv_weight = torch.nn.Parameter(torch.randn(conv_dim, 1, d_conv) * 0.5)
        self.conv_bias = torch.nn.Parameter(torch.randn(conv_dim) * 0.1)
        self.dt_bias = torch.nn.Parameter(torch.log(torch.expm1(torch.rand(nheads) * 0.1 + 0.001)))
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1.0, nheads + 1)))
        self.D = torch.nn.Parameter(torch.ones(nheads))
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(self.d_ssm))
        self.out_proj = torch.nn.Linear(self.d_ssm, d_model, bias=False)

    def conv(self, xBC, seq_idx):  # (b, l, c): tap k reads position t − k only within t's sequence
        l = xBC.shape[1]
        xp = F.pad(xBC, (0, 0, self.k - 1, 0))
        sp = F.pad(seq_idx, (self.k - 1, 0), value=-1)
        out = self.conv_bias
        for k in range(self.k):
            same = (sp[:, k:k + l] == seq_idx).unsqueeze(-1).to(xBC.dtype)
            out = out + xp[:, k:k + l] * self.conv_weight[:, 0, k] * same
        return out

    def forward(self, u, seq_idx):
        b, l, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([self.d_ssm, self.d_ssm + 2 * self.g * self.n, self.h], dim=-1)
        xBC = F.silu(self.conv(xBC, seq_idx))
        x, B, C = xBC.split([self.d_ssm, self.g * self.n, self.g * self.n], dim=-1)
        y = mamba_chunk_scan_combined(
            x.reshape(b, l, self.h, self.p), dt, -torch.exp(self.A_log.float()), B.reshape(b, l, self.g, self.n),
            C.reshape(b, l, self.g, self.n), chunk_size=self.chunk, D=self.D, z=None, dt_bias=self.dt_bias,
            dt_softplus=True, seq_idx=seq_idx)
        y = y.reshape(b, l, self.d_ssm) * F.silu(z)  # RMSNormGated, norm_before_gate=False
        grouped = y.reshape(b, l, self.g, -1)
        y = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + 1e-5)).reshape(b, l, -1)
        return self.out_proj(y * self.norm_weight)


@pytest.fixture(scope="module")
def mamba2_block():
    torch.manual_seed(0)
    return PackedMamba2().eval()


def test_mamba2_block_packed_batch_equals_each_sequence_alone(mamba2_block):
    block = mamba2_block.double()
    try:
        rows = [[30, 34, 36], [7, 9, 80, 4]]
        seq_idx = packed_seq_idx(rows)
        u = torch.randn(2, 100, 16, dtype=torch.float64)
        with torch.no_grad():
            packed = block(u, seq_idx)
            for r, lengths in enumerate(rows):
                starts = np.cumsum([0, *lengths])
                for s, e in zip(starts, starts[1:]):
                    one = block(u[r:r + 1, s:e], torch.zeros(1, e - s, dtype=torch.int32))
                    # float64 throughout: only summation order differs between packed and alone.
                    torch.testing.assert_close(packed[r:r + 1, s:e], one, rtol=1e-10, atol=1e-12)
    finally:
        block.float()


def test_mamba2_block_exports_with_seq_idx_input(mamba2_block):
    block = mamba2_block
    batch, seqlen = torch.export.Dim("batch"), torch.export.Dim("seqlen")
    model = export(block, (torch.randn(2, 40, 16), packed_seq_idx([[20, 20], [40]])),
                   dynamic_shapes=({0: batch, 1: seqlen}, {0: batch, 1: seqlen}), input_names=["u", "seq_idx"])
    assert_block_session_matches(make_session(model.SerializeToString(), "cpu"), block)


def assert_block_session_matches(session, block, against_float64=False):
    """The exported packed block at 3 lengths (1, 37, 100) against eager (and float64), <= RTOL."""
    for rows in ([[1], [1]], [[10, 27], [37]], [[16, 48, 36], [7, 9, 80, 4]]):
        seq_idx = packed_seq_idx(rows)
        u = torch.randn(2, seq_idx.shape[1], 16)
        got = session.run(None, {"u": u.numpy(), "seq_idx": seq_idx.numpy()})[0]
        with torch.no_grad():
            assert rel_err(got, block(u, seq_idx)) < RTOL, rows
            if against_float64:
                want64 = block.double()(u.double(), seq_idx)
                block.float()
                assert rel_err(got, want64) < RTOL, rows


def test_mamba2_block_with_seq_idx_exports_with_plain_torch_onnx_export(mamba2_block):
    """The same packed block through a plain torch.onnx.export (no scan_export wrapper): seq_idx is a
    graph input, resets are exact (log-decay -1e30 at each sequence start), and the graph does not
    depend on the example length."""
    import onnx

    block = mamba2_block
    dyn = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seqlen")}

    def plain(example_len):
        ids = packed_seq_idx([[example_len // 2, example_len - example_len // 2], [example_len]])
        prog = torch.onnx.export(block, (torch.randn(2, example_len, 16), ids), dynamo=True,
                                 dynamic_shapes=(dyn, dyn), input_names=["u", "seq_idx"])
        return prog.model_proto

    model = plain(40)
    hist = lambda m: sorted(n.op_type for n in m.graph.node)  # noqa: E731
    assert hist(model) == hist(plain(24)) and "Scan" in hist(model)
    onnx.checker.check_model(model, full_check=True)
    # The project's parity budget (1e-5); measured ~3e-7, float32 rounding of the same algebra.
    assert_block_session_matches(make_session(model.SerializeToString(), "cpu"), block, against_float64=True)
