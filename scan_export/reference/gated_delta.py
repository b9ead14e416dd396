"""Gated DeltaNet (Qwen3-Next / Qwen3.5 linear attention): the sequential oracle, a chunked prefill
form and the one-token decode step.

Glossary: b batch, l seqlen, hk key heads, h value heads (h = r·hk, each q/k head serves r
consecutive value heads, as transformers' repeat_interleave), dk key dim, dv value dim, T chunk
size, nc chunks. Per value head, with the state S: (dk, dv), log-decay g_t ≤ 0 and β_t ∈ (0, 1):

    S ← exp(g_t)·S;  δ_t = β_t·(v_t − k_tᵀS);  S ← S + k_t ⊗ δ_t;  o_t = q_tᵀS

q and k are L2-normalised first (use_qk_l2norm, transformers' l2norm with eps 1e-6 under the
rsqrt) and q is scaled by dk^-0.5. In the model, g = −exp(A_log)·softplus(a + dt_bias) and
β = sigmoid(b) (gate_from_projections). The derivation of the chunked form is docs/derivation.md,
"Gated DeltaNet".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ssd import reverse_exclusive_cumsum
from ..errors import ScanExportError

GDN_DEFAULT_CHUNK_SIZE = 64
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """transformers' (and FLA's) l2norm: x·rsqrt(Σx² + eps), eps inside the root, not a max."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gate_from_projections(a, b, A_log, dt_bias):
    """Qwen3NextGatedDeltaNet's gates. a, b: (b, l, h), A_log, dt_bias: (h,) -> g: (b, l, h) ≤ 0, β: (b, l, h)."""
    g = -A_log.exp() * F.softplus(a + dt_bias)
    return g, b.sigmoid()


def _heads(q, k, v, g, beta, use_qk_l2norm):
    """Repeats q/k over value heads, normalises, scales q -> q, k: (b, l, h, dk), v, g, beta as given."""
    if q.shape != k.shape or q.dim() != 4 or v.dim() != 4 or q.shape[:2] != v.shape[:2]:
        raise ScanExportError(f"q, k: (b, l, hk, dk), v: (b, l, h, dv); got q {tuple(q.shape)}, "
                              f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    hk, h = k.shape[2], v.shape[2]
    if h % hk:
        raise ScanExportError(f"value heads ({h}) must be a multiple of key heads ({hk})")
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ScanExportError(f"g and beta must be (b, l, h) = {tuple(v.shape[:3])}, got {tuple(g.shape)}, "
                              f"{tuple(beta.shape)}")
    if h != hk:
        q, k = q.repeat_interleave(h // hk, dim=2), k.repeat_interleave(h // hk, dim=2)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k


def _initial(initial_state, v, dk, f):
    b, _, h, dv = v.shape
    if initial_state is None:
        return v.new_zeros(b, h, dk, dv, dtype=f)
    if tuple(initial_state.shape) != (b, h, dk, dv):
        raise ScanExportError(f"initial_state must be (b, h, dk, dv) = {(b, h, dk, dv)}, got {tuple(initial_state.shape)}")
    return initial_state.to(f)


def gated_delta_rule_ref(q, k, v, g, beta, initial_state=None, output_final_state=True, use_qk_l2norm=True):
    """The oracle: one step at a time, in the inputs' own dtype (float64 for the tests).

    q, k: (b, l, hk, dk)  v: (b, l, h, dv)  g, beta: (b, l, h)  initial_state: (b, h, dk, dv)
    -> o: (b, l, h, dv), final_state: (b, h, dk, dv) or None."""
    f = v.dtype
    q, k = _heads(q.to(f), k.to(f), v, g, beta, use_qk_l2norm)
    S = _initial(initial_state, v, q.shape[-1], f)
    out = []
    for t in range(v.shape[1]):
        S = S * g[:, t, :, None, None].to(f).exp()
        kv = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        delta = (v[:, t] - kv) * beta[:, t, :, None].to(f)
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, 1) if out else v.new_zeros(v.shape)
    return o, (S if output_final_state else None)


def gated_delta_step(q, k, v, g, beta, state, use_qk_l2norm=True):
    """One decode token. q, k: (b, hk, dk)  v: (b, h, dv)  g, beta: (b, h)  state: (b, h, dk, dv)
    -> o: (b, h, dv), new state. Computed in float32 (float64 for float64 inputs), o cast back."""
    f = torch.float64 if v.dtype == torch.float64 else torch.float32
    o, S = gated_delta_rule_ref(q[:, None].to(f), k[:, None].to(f), v[:, None].to(f), g[:, None].to(f),
                                beta[:, None].to(f), state, True, use_qk_l2norm)
    return o[:, 0].to(v.dtype), S


def segsum_exp_masked(g, strictly_lower, causal):
    """g: (..., T) -> Γ: (..., T, T), Γ[i, j] = exp(Σ_{j<k≤i} g_k) for j ≤ i, else 0.

    A masked cumsum down the rows: each entry sums its own terms, never a difference of cumsums,
    and every exponent is ≤ 0 (the SSD lowering's form; masks multiply, so it exports as Mul)."""
    return torch.exp(torch.cumsum(g.unsqueeze(-1) * strictly_lower, dim=-2)) * causal


def block_gather_index(T: int, s: int) -> torch.Tensor:
    """Flat indices into a (T, T) matrix of its blocks below the diagonal at doubling level s:
    block m is rows [2ms + s, 2ms + 2s) × cols [2ms, 2ms + s) -> (T/2s, s, s) int64."""
    m = torch.arange(T // (2 * s))[:, None, None] * 2 * s
    i = torch.arange(s)[None, :, None]
    j = torch.arange(s)[None, None, :]
    return (m + s + i) * T + (m + j)


def unit_lower_inverse(M: torch.Tensor) -> torch.Tensor:
    """M: (..., T, T) unit lower triangular, T a power of 2 -> M⁻¹, by recursive doubling:
    inv [[A, 0], [C, B]] = [[A⁻¹, 0], [−B⁻¹·C·A⁻¹, B⁻¹]], log2 T levels of batched MatMuls.

    Why not a Neumann product Π(I + N^(2^i)): the powers of N grow like binomials when keys
    repeat (β ≈ 1, k_i ≈ k_j) while M⁻¹ stays bounded, so it cancels catastrophically. Here every
    intermediate is a diagonal block of M⁻¹ itself. Why not solve_triangular: ONNX has no such op,
    and this is the arithmetic the lowering runs."""
    T = M.shape[-1]
    if T & (T - 1):
        raise ScanExportError(f"chunk size must be a power of 2, got {T}")
    lead = M.shape[:-2]
    flat = M.flatten(-2)
    inv = M.new_ones(*lead, T, 1, 1)
    s = 1
    while s < T:
        nb = T // (2 * s)
        pair = inv.unflatten(-3, (nb, 2))  # (..., nb, 2, s, s)
        A_inv, B_inv = pair[..., 0, :, :], pair[..., 1, :, :]
        C = flat[..., block_gather_index(T, s).to(M.device)]  # (..., nb, s, s)
        X = -(B_inv @ C @ A_inv)
        top = torch.cat([A_inv, torch.zeros_like(A_inv)], -1)
        inv = torch.cat([top, torch.cat([X, B_inv], -1)], -2)  # (..., nb, 2s, 2s)
        s *= 2
    return inv.squeeze(-3)


def chunk_operands(q, k, v, g, beta, T):
    """The chunk-parallel part: every chunk's WY operands at once (section 2 of the derivation).

    q, k: (b, h, nc, T, dk), v: (b, h, nc, T, dv), g, beta: (b, h, nc, T), all padded with zero steps
    -> W1 (…, T, dv), W2 (…, T, dk), Qd (…, T, dk), intra (…, T, T), Kend (…, T, dk), decay (…, 1, 1):
        U = W1 − W2·S,  o = Qd·S + intra·U,  S' = decay·S + Kendᵀ·U."""
    ones = torch.ones(T, T, dtype=g.dtype, device=g.device)
    strictly_lower, causal = ones.tril(-1), ones.tril()
    Gam = segsum_exp_masked(g, strictly_lower, causal)  # Γ[i, j] = γ_i / γ_j, j ≤ i
    G = torch.cumsum(g, -1)  # log γ_i ≤ 0
    gamma = torch.exp(G).unsqueeze(-1)
    kb = k * beta.unsqueeze(-1)
    M = torch.eye(T, dtype=g.dtype, device=g.device) + (kb @ k.transpose(-1, -2)) * Gam * strictly_lower
    Minv = unit_lower_inverse(M)
    W1 = Minv @ (v * beta.unsqueeze(-1))
    W2 = Minv @ (kb * gamma)
    Qd = q * gamma
    intra = (q @ k.transpose(-1, -2)) * Gam
    Kend = k * torch.exp(reverse_exclusive_cumsum(g)).unsqueeze(-1)
    decay = gamma[..., -1:, :]  # γ_T: (…, 1, 1)
    return W1, W2, Qd, intra, Kend, decay


def gated_delta_rule_chunked(q, k, v, g, beta, initial_state=None, output_final_state=True, use_qk_l2norm=True,
                             chunk_size=GDN_DEFAULT_CHUNK_SIZE):
    """Chunked prefill: same arguments, shapes and results as gated_delta_rule_ref, computed in
    float32 (float64 for float64 inputs), o cast back to v's dtype. l is padded to nc·T with
    identity steps (g = 0, β = 0, q = k = v = 0)."""
    f = torch.float64 if v.dtype == torch.float64 else torch.float32
    dtype_in = v.dtype
    q, k, v, g, beta = (t.to(f) for t in (q, k, v, g, beta))
    q, k = _heads(q, k, v, g, beta, use_qk_l2norm)
    b, l, h, dv = v.shape
    dk = q.shape[-1]
    S = _initial(initial_state, v, dk, f)
    T = chunk_size
    pad = (T - l % T) % T

    def chunks(t):  # (b, l, h[, d]) -> (b, h, nc, T[, d])
        t = t.movedim(1, 2) if t.dim() == 4 else t.transpose(1, 2)
        t = F.pad(t, [0, 0, 0, pad] if t.dim() == 4 else [0, pad])
        return t.unflatten(2, (-1, T))

    W1, W2, Qd, intra, Kend, decay = chunk_operands(*(chunks(t) for t in (q, k, v, g, beta)), T)
    out = []
    for c in range(W1.shape[2]):
        U = W1[:, :, c] - W2[:, :, c] @ S
        out.append(Qd[:, :, c] @ S + intra[:, :, c] @ U)
        S = decay[:, :, c] * S + Kend[:, :, c].transpose(-1, -2) @ U
    o = torch.cat(out, 2)[:, :, :l].transpose(1, 2) if out else v.new_zeros(b, l, h, dv)
    return o.to(dtype_in), (S if output_final_state else None)


# Regimes the tests and docs/numerics.md measure (g and β; q, k, v, initial_state ~ N(0, 1)):
#   random        g ∈ U[−1, 0], β ∈ U(0, 1)
#   model_init    Qwen3NextGatedDeltaNet's init: A ∈ U(0.01, 16), dt_bias = 1, a, b ~ N(0, 1) through
#                 gate_from_projections (g down to about −40)
#   strong_decay  g ∈ U[−20, 0]: a chunk's cumulative decay reaches −640, exp of it underflows
#   weak_decay    g ∈ U[−1e-3, 0]: long memory, the state and the carried terms dominate
#   beta_0        β = 1e-6: almost no write, the output is mostly the decayed initial state
#   beta_1        β = 1 − 1e-6: full overwrite, the UT system at its largest
#   aligned_keys  β ≈ 1 and keys within 1% of one direction: the triangular system's worst case
GDN_REGIMES = ("random", "model_init", "strong_decay", "weak_decay", "beta_0", "beta_1", "aligned_keys")


def make_gdn_inputs(regime, b=2, l=64, hk=2, h=4, dk=16, dv=8, seed=0, dtype=torch.float32, with_initial_state=True):
    if regime not in GDN_REGIMES:
        raise ScanExportError(f"regime must be one of {GDN_REGIMES}, got {regime!r}")
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    ru = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rn(b, l, hk, dk), rn(b, l, hk, dk), rn(b, l, h, dv)
    g, beta = -ru(b, l, h), ru(b, l, h)
    if regime == "model_init":
        A_log = torch.empty(h, dtype=torch.float64).uniform_(0.01, 16, generator=gen).log()
        g, beta = gate_from_projections(rn(b, l, h), rn(b, l, h), A_log, torch.ones(h, dtype=torch.float64))
    elif regime == "strong_decay":
        g = -20 * ru(b, l, h)
    elif regime == "weak_decay":
        g = -1e-3 * ru(b, l, h)
    elif regime == "beta_0":
        beta = torch.full_like(beta, 1e-6)
    elif regime in ("beta_1", "aligned_keys"):
        beta = torch.full_like(beta, 1 - 1e-6)
    if regime == "aligned_keys":
        k = rn(1, 1, hk, dk) + 0.01 * rn(b, l, hk, dk)
    out = dict(q=q, k=k, v=v, g=g, beta=beta)
    if with_initial_state:
        out["initial_state"] = rn(b, h, dk, dv)
    return {n: t.to(dtype) for n, t in out.items()}
