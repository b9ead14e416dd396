"""mamba_ssm's own `test_selective_scan` grid (tests/ops/test_selective_scan.py), float32, run against
our drop-in `selective_scan_fn`: forward and backward, with mamba_ssm's inputs and tolerances.

The grid: every flag of that file (its commented-out parametrize lines are the full grid, the active
ones a subset): is_variable_B × is_variable_C × varBC_groups {1, 2} (groups > 1 only when both are
variable, mamba's own skip) × has_D × has_z × has_delta_bias × delta_softplus × return_last_state,
= 5 × 32 = 160 flag cases, plus the active grid, seqlens {128 … 4096} × groups {1, 2} with every flag
on (12 cases): 172. 64 of the 160 have one of B, C fixed and the other input-dependent.
Trimmed for a 2-core CI (mamba's shapes, shorter seqlens): the 160 flag cases cycle through mamba's
seqlens 8 … 372 instead of each running all 13, and the active grid's 2048 and 4096 become 372 and
784 (the float64 sequential reference with autograd costs ~3 s of CPU at 4096).

The reference is mamba_ssm's `selective_scan_ref`, transcribed below without einops and run in
float64 (mamba runs it in float32); gradients are its autograd's, from `out` only, as mamba's test does.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from scan_export import selective_scan_fn
from scan_export.reference import selective_scan_ref

from .conftest import rel_err


def mamba_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_ref (real A), line for line, in the
    inputs' dtype instead of `.float()`."""
    dtype_in = u.dtype
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    is_variable_B = B.dim() >= 3
    is_variable_C = C.dim() >= 3
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if not is_variable_B:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)  # repeat "B G N L -> B (G H) N L"
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if is_variable_C and C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    last_state = None
    # Per-step slices by unbind rather than mamba's [..., i] indexing: the same values, but a
    # backward of O(l) instead of O(l²) (each index op's backward writes a full-size gradient).
    dA, dBu = deltaA.unbind(2), deltaB_u.unbind(2)
    C_steps = C.unbind(-1) if is_variable_C else None
    for i in range(u.shape[2]):
        x = dA[i] * x + dBu[i]
        if not is_variable_C:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C_steps[i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C_steps[i])
        if i == u.shape[2] - 1:
            last_state = x
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(dtype=dtype_in)
    return out if not return_last_state else (out, last_state)


BC_KINDS = [(vb, vc, g) for vb, vc, g in itertools.product([False, True], [False, True], [1, 2])
            if g == 1 or (vb and vc)]  # mamba: "if varBC_groups > 1 and (not is_variable_B or not is_variable_C): skip"
FLAGS = list(itertools.product([False, True], repeat=5))  # has_D, has_z, has_delta_bias, delta_softplus, return_last_state
SHORT_SEQLENS = [8, 16, 32, 64, 128, 256, 372]  # the start of mamba's commented-out seqlen list
CASES = [(*bc, *flags, SHORT_SEQLENS[k % len(SHORT_SEQLENS)])
         for k, (bc, flags) in enumerate(itertools.product(BC_KINDS, FLAGS))]
CASES += [(True, True, g, True, True, True, True, True, l) for l in (128, 256, 512, 1024, 372, 784) for g in (1, 2)]
assert len(CASES) == 172 and sum(vb != vc for vb, vc, *_ in CASES) == 64


def _case_id(case):
    vb, vc, g, has_D, has_z, has_bias, softplus, last, l = case
    kind = lambda v: "var" if v else "fix"  # noqa: E731
    flags = "".join(c for c, on in zip("DzbsL", (has_D, has_z, has_bias, softplus, last)) if on)
    return f"B{kind(vb)}-C{kind(vc)}-g{g}-{flags or 'none'}-l{l}"


def mamba_inputs(is_variable_B, is_variable_C, varBC_groups, has_D, has_z, has_delta_bias, seqlen):
    """The inputs of mamba_ssm's test_selective_scan, drawn in its order from its seed (on CPU)."""
    torch.random.manual_seed(0)
    batch_size, dim, dstate = 2, 4, 8
    A = -0.5 * torch.rand(dim, dstate)
    bc_shape = lambda variable: ((dim, dstate) if not variable else (batch_size, dstate, seqlen) if varBC_groups == 1  # noqa: E731
                                 else (batch_size, varBC_groups, dstate, seqlen))
    B = torch.randn(*bc_shape(is_variable_B))
    C = torch.randn(*bc_shape(is_variable_C))
    D = torch.randn(dim) if has_D else None
    z = torch.randn(batch_size, dim, seqlen) if has_z else None
    delta_bias = 0.5 * torch.rand(dim) if has_delta_bias else None
    u = torch.randn(batch_size, dim, seqlen)
    delta = 0.5 * torch.rand(batch_size, dim, seqlen)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_selective_scan(case):
    is_variable_B, is_variable_C, varBC_groups, has_D, has_z, has_delta_bias, delta_softplus, return_last_state, \
        seqlen = case
    # mamba_ssm's float32 tolerances, verbatim.
    rtol, atol = 6e-4, 2e-3
    rtolw, atolw = 1e-3, 1e-3
    if has_z:  # "If we have z, the errors on the weights seem higher"
        rtolw, atolw = max(rtolw, rtol), max(atolw, atol)
    inputs = mamba_inputs(is_variable_B, is_variable_C, varBC_groups, has_D, has_z, has_delta_bias, seqlen)
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    ref = {k: v.double().requires_grad_() for k, v in inputs.items() if v is not None}
    kwargs = dict(delta_softplus=delta_softplus, return_last_state=return_last_state)
    # (mamba's test unpacks `out, *rest = ...` even without return_last_state, which splits the batch.)
    as_tuple = lambda r: r if return_last_state else (r,)  # noqa: E731
    out, *rest = as_tuple(selective_scan_fn(**ours, **kwargs))
    out_ref, *rest_ref = as_tuple(mamba_selective_scan_ref(**ref, **kwargs))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), out_ref.detach(), rtol=rtol, atol=atol)
    if return_last_state:
        assert rest[0].dtype == torch.float32  # mamba: the weight dtype
        torch.testing.assert_close(rest[0].double(), rest_ref[0].detach(), rtol=rtol, atol=atol)
    # Our float64 oracle has mamba's semantics: same function, only summation order differs.
    with torch.no_grad():
        ours64 = selective_scan_ref(**{k: v.double() for k, v in inputs.items() if v is not None}, **kwargs)
    torch.testing.assert_close(ours64[0] if return_last_state else ours64, out_ref.detach(), rtol=1e-12, atol=1e-12)

    g = torch.randn_like(out)
    out_ref.backward(g.double())
    out.backward(g)
    tol = {  # mamba_ssm's gradient tolerances, verbatim
        "u": (rtol * 2, atol * 2), "delta": (rtol * 5, atol * 10), "A": (rtolw, atolw * 5),
        "B": (rtol, atol) if is_variable_B else (rtolw, atolw), "C": (rtol, atol) if is_variable_C else (rtolw, atolw),
        "D": (rtolw, atolw), "z": (rtolw, atolw), "delta_bias": (rtolw, atolw),
    }
    for name, leaf in ours.items():
        torch.testing.assert_close(leaf.grad.double(), ref[name].grad, rtol=tol[name][0], atol=tol[name][1],
                                   msg=lambda m, name=name: f"d{name}: {m}")


# ------------------------------------------------------------------------------------------------
# Mixed B/C through the whole-module export (both ONNX forms), and the one combination refused.

DYN = torch.export.Dim.DYNAMIC


class MixedBC(torch.nn.Module):
    """A scan whose B and C each are fixed (a weight) or input-dependent (sliced from u): 0 = fixed,
    1 = (b, n, l), g > 1 = (b, g, n, l)."""

    def __init__(self, groups_B, groups_C, d=8, n=4):
        super().__init__()
        self.groups, self.n = (groups_B, groups_C), n
        self.A = torch.nn.Parameter(-torch.rand(d, n))
        self.W = torch.nn.Parameter(torch.randn(2, d, n))
        self.D = torch.nn.Parameter(torch.randn(d))

    def forward(self, u, delta, h0):
        b, _, l = u.shape
        B, C = (self.W[i] if g == 0 else u[:, :g * self.n].reshape(b, g, self.n, l).squeeze(1) if g == 1
                else u[:, :g * self.n].reshape(b, g, self.n, l) for i, g in enumerate(self.groups))
        return selective_scan_fn(u, delta, self.A, B, C, self.D, u, None, True, return_last_state=True,
                                 initial_state=h0)


@pytest.mark.parametrize("form", ["sequential", "chunked"])
@pytest.mark.parametrize("groups_B,groups_C", [(0, 1), (1, 0), (0, 2), (2, 0)])
def test_mixed_B_C_export(form, groups_B, groups_C):
    from scan_export.onnx.export import export
    from scan_export.runtime import make_session

    torch.manual_seed(0)
    m = MixedBC(groups_B, groups_C).eval()
    args = (torch.randn(2, 8, 9), torch.randn(2, 8, 9), torch.randn(2, 8, 4))
    model = export(m, args, dynamic_shapes=({0: DYN, 2: DYN}, {0: DYN, 2: DYN}, {0: DYN}), scan_form=form)
    session = make_session(model.SerializeToString(), "cpu")
    for l in (1, 40):  # one step (the chunked form's decode branch) and several chunks
        u, delta, h0 = torch.randn(3, 8, l), torch.randn(3, 8, l), torch.randn(3, 8, 4)
        out, state = session.run(None, dict(zip([i.name for i in session.get_inputs()],
                                                (u.numpy(), delta.numpy(), h0.numpy()))))
        with torch.no_grad():
            ref, ref_state = m.double()(u.double(), delta.double(), h0.double())
            m.float()
        # float32 graph against the float64 oracle: measured ≤ 4e-7; 1e-5 is the parity budget.
        assert rel_err(out, ref) < 1e-5 and rel_err(state, ref_state) < 1e-5


def test_two_input_dependent_B_C_need_one_group_count():
    """mamba_ssm's CUDA kernel requires C to have B's group count; a different one is refused by name."""
    u = torch.randn(2, 8, 10)
    with pytest.raises(ValueError, match=r"B and C must have the same number of groups .* \(2\) .* \(4\)"):
        selective_scan_fn(u, u.abs(), -torch.rand(8, 4), torch.randn(2, 2, 4, 10), torch.randn(2, 4, 4, 10))
