"""`scan-export verify`: an export against transformers' own implementation of the checkpoint.

Like check.py, this is where torch, transformers and onnxruntime meet; deployments never import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .runtime.generate import ExportedMamba, generate
from .runtime.parity import OutputMismatch, compare

PROMPT_LENGTHS = (1, 7, 64, 100)
# fp32 export vs transformers fp32: same math, different kernels and summation order. Measured
# ~6e-7 on tiny models; 1e-4 is the budget (24-layer models accumulate more rounding).
LOGITS_RTOL = {"float32": 1e-4, "float16": 2e-2}


@dataclass
class VerifyReport:
    logits: list[OutputMismatch] = field(default_factory=list)
    states: list[OutputMismatch] = field(default_factory=list)
    tokens_match: list[bool] = field(default_factory=list)
    tokens: list[tuple[list[int], list[int]]] = field(default_factory=list)
    rtol: float = 1e-4

    @property
    def passed(self) -> bool:
        ok = all(m.finite and m.rel <= self.rtol for m in self.logits + self.states)
        return ok and all(self.tokens_match)

    def format(self) -> str:
        lines = ["output                      max_abs        rel   result"]
        for m in self.logits + self.states:
            verdict = "ok" if m.finite and m.rel <= self.rtol else f"FAIL (rtol {self.rtol:g})"
            lines.append(f"{m.name:<26} {m.max_abs:>9.2e} {m.rel:>10.2e}   {verdict}")
        for i, (ok, (ours, theirs)) in enumerate(zip(self.tokens_match, self.tokens)):
            lines.append(f"greedy prompt {i}: {len(ours)} tokens {'identical' if ok else 'DIFFER'}"
                         + ("" if ok else f"\n  onnxruntime  {ours}\n  transformers {theirs}"))
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _load_hf(checkpoint_dir):
    import torch
    import transformers

    from .reference.models import read_hf_config

    model_type = read_hf_config(checkpoint_dir)["model_type"]
    cls = {"mamba": transformers.MambaForCausalLM, "falcon_mamba": transformers.FalconMambaForCausalLM,
           "mamba2": transformers.Mamba2ForCausalLM, "bamba": transformers.BambaForCausalLM,
           "granitemoehybrid": transformers.GraniteMoeHybridForCausalLM}[model_type]
    return cls.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()


def _compare_hybrid_cache(ours, state, cache) -> list[OutputMismatch]:
    """Hybrid exports: Mamba-2 conv/ssm states and attention KV caches against transformers' cache."""
    out, k = [], 0
    for entry in ours.description["state"]:
        layer = entry["layer"]
        if entry["kind"] == "attention":
            refs = [cache.layers[layer].keys, cache.layers[layer].values]
        else:  # HF keeps the conv state (b, conv_dim, K); ours is the last K−1 columns channels-last
            refs = [cache.get_conv_state(layer)[..., 1:].transpose(1, 2), cache.get_recurrent_state(layer)]
        for ref in refs:
            out.append(compare(ours.state_outputs[k], state[k], ref.float().numpy()))
            k += 1
    return out


def verify_export(export_dir, checkpoint_dir, *, prompt_lengths=PROMPT_LENGTHS, n_tokens: int = 32,
                  n_prompts: int = 3, provider: str = "cpu", seed: int = 0) -> VerifyReport:
    import torch

    ours = ExportedMamba(export_dir, provider)
    hf = _load_hf(checkpoint_dir)
    report = VerifyReport(rtol=LOGITS_RTOL[ours.description["dtype"]])
    rng = np.random.default_rng(seed)
    vocab = ours.vocab_size
    outputs = ours.state_outputs  # compared after the longest prefill
    for length in prompt_lengths:
        ids = rng.integers(0, vocab, size=(2, length))
        logits, state = ours.forward(ids, ours.zero_state(2))
        with torch.no_grad():
            out = hf(torch.from_numpy(ids), use_cache=True)
        report.logits.append(compare(f"logits l={length}", logits, out.logits.float().numpy()))
        if length == max(prompt_lengths) and ours.takes_attention_mask:
            report.states += _compare_hybrid_cache(ours, state, out.cache)
        elif length == max(prompt_lengths):
            cache = out.cache
            for layer in range(ours.description["num_layers"]):
                # HF keeps (b, d, K), we keep the last K−1 columns channels-last: (b, K−1, d).
                conv = cache.get_conv_state(layer).float().numpy()[..., 1:].transpose(0, 2, 1)
                ssm = cache.get_recurrent_state(layer).float().numpy()
                if ours.description["model_type"] != "mamba2":  # HF (b, d, n), ours channels-last (b, n, d)
                    ssm = ssm.transpose(0, 2, 1)
                report.states.append(compare(outputs[2 * layer], state[2 * layer], conv))
                report.states.append(compare(outputs[2 * layer + 1], state[2 * layer + 1], ssm))
    eos = ours.description.get("eos_token_id")
    for i in range(n_prompts):
        prompt = rng.integers(0, vocab, size=int(rng.integers(2, 12))).tolist()
        (got,) = generate(ours, [prompt], n_tokens, stop_token_id=eos)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                              do_sample=False)[0, len(prompt):].tolist()
        if eos is not None and eos in ref:
            ref = ref[: ref.index(eos) + 1]
        report.tokens.append((got, ref))
        report.tokens_match.append(got == ref)
    return report
