"""Checks every hybrid family's tests share (tests/test_hybrid_models.py, test_nemotron_h.py,
test_falcon_h1.py, test_jamba.py, test_zamba2.py): one body each, called from each family's tests."""

import numpy as np
import torch

from scan_export.runtime.generate import generate

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [42]]
# fp32 export vs transformers fp32: same algebra, different kernels and summation orders; measured
# ≤ 2.1e-6 on these models (README). 1e-4 is the budget.
LOGITS_RTOL = 1e-4


def assert_logits_match(hf, model, seqlen: int) -> None:
    """Logits of a (2, seqlen) random prompt from a fresh state, against transformers' forward."""
    ids = np.random.default_rng(seqlen).integers(0, model.vocab_size, (2, seqlen))
    logits, _ = model.forward(ids, model.zero_state(2))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.ones(2, seqlen, dtype=torch.long)).logits.numpy()
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel < LOGITS_RTOL, f"logits rel error {rel:.2e} at seqlen {seqlen}"


def assert_ragged_equals_singles(model) -> None:
    """Groups of equal length are prefilled apart, their KV caches left-padded and masked when stacked."""
    batched = generate(model, PROMPTS, 32)
    singles = [generate(model, [p], 32)[0] for p in PROMPTS]
    assert batched == singles


def assert_prefill_then_decode_equals_one_prefill(model) -> None:
    ids = np.random.default_rng(1).integers(0, model.vocab_size, (2, 40))
    full, _ = model.forward(ids, model.zero_state(2))
    _, state = model.forward(ids[:, :30], model.zero_state(2))
    steps = []
    for t in range(30, 40):
        logits, state = model.forward(ids[:, t:t + 1], state)
        steps.append(logits[:, 0])
    # The same recurrence split differently (chunked scan vs single steps): rounding only.
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 30:], rtol=0, atol=1e-4 * np.abs(full).max())


def assert_greedy_tokens_match(hf, model, cached_must_agree: bool = True) -> None:
    """32 greedy tokens for each of PROMPTS equal transformers' full forward recomputed per token;
    with cached_must_agree, transformers' cached generate() must agree with that full forward too
    (checked), so the referee is unambiguous. The tokens must differ between prompts and within each
    (not a degenerate model)."""
    ours = generate(model, PROMPTS, 32)
    for prompt, got in zip(PROMPTS, ours):
        cached, full = hf_greedy(hf, prompt, 32)
        if cached_must_agree:
            assert cached == full
        assert got == full
    assert len({tuple(t) for t in ours}) == 3 and all(len(set(t)) > 4 for t in ours)


def hf_greedy(hf, prompt, n):
    """transformers' generate (KV cache + its Mamba cache), and what its full forward picks after
    the prompt plus each prefix of those tokens. One full forward over prompt + tokens gives every
    step's choice at once; where they equal the cached tokens, that is exactly the sequence a full
    forward recomputed per token would produce."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        cached = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        cached = cached[0, len(prompt):].tolist()
        logits = hf(torch.tensor([prompt + cached[:-1]])).logits[0, len(prompt) - 1:]
    return cached, logits.argmax(-1).tolist()
