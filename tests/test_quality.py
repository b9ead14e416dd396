"""Quality of exports on the trained byte-level fixtures (tests/fixtures/README.md): held-out bits
per byte in onnxruntime against transformers, and what a lower-precision export costs.

The held-out slice used here is the first 4096 bytes of tests/fixtures/bytes-heldout.txt (the full
split is 32 KB; 4 KB keeps the transformers float64 reference to seconds, and every dtype is judged
on the same bytes, so the ratios compare like with like).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from scan_export.cli import build_parser, main
from scan_export.runtime import ExportedModel
from scan_export.runtime.quality import bits_per_byte, greedy_agreement

FIXTURES = Path(__file__).parent / "fixtures"
HELDOUT = (FIXTURES / "bytes-heldout.txt").read_bytes()[:4096]
PROMPTS = [HELDOUT[0:32], HELDOUT[2048:2080]]
MODEL_TYPES = ("mamba", "mamba2")


def export_model_flags() -> dict[str, tuple]:
    """{option string: its choices (or ())} of `scan-export export-model`, read from the CLI itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s: tuple(a.choices or ()) for a in sub.choices["export-model"]._actions for s in a.option_strings}


def _quantize_skip(kind: str):
    choices = export_model_flags().get("--quantize")
    if choices is None:
        return pytest.mark.skip(reason=f"export-model has no --quantize option yet (issue 13): no {kind} export to judge")
    if choices and kind not in choices:
        return pytest.mark.skip(reason=f"export-model --quantize does not offer {kind} (choices: {list(choices)})")
    return []


# (name, export-model flags, bound on held-out bpb / fp32's). The int rows are issue 13's acceptance
# bounds; they run as soon as export-model has --quantize.
# fp16: weights and activations rounded to 11 significant bits (relative 5e-4); measured on these
# fixtures the held-out bpb moves by <= 1e-4 bits (0.003 %, README); 0.5 % is a generous margin and
# still half the int8 bound, so an fp16 export that degrades like a quantized one fails.
LOWER_PRECISION = [
    pytest.param("fp16", ["--dtype", "fp16"], 1.005, id="fp16"),
    pytest.param("int8", ["--quantize", "int8"], 1.01, id="int8", marks=_quantize_skip("int8")),
    pytest.param("int4", ["--quantize", "int4"], 1.05, id="int4", marks=_quantize_skip("int4")),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(model_type, name): export dir}, made through the CLI on first request."""
    root, made = tmp_path_factory.mktemp("quality"), {}

    def get(model_type: str, name: str, flags: list[str]) -> Path:
        if (model_type, name) not in made:
            out = root / f"{model_type}-{name}"
            assert main(["export-model", str(FIXTURES / f"{model_type}-bytes"), "--out", str(out), "--quiet", *flags]) == 0
            made[model_type, name] = out
        return made[model_type, name]

    return get


@pytest.fixture(scope="module")
def fp32_bpb(exports):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = bits_per_byte(ExportedModel(exports(model_type, "fp32", [])), HELDOUT)
        return cache[model_type]

    return get


def transformers_bits_per_byte(model_type: str, data: bytes) -> float:
    """The referee: transformers' own model class in float64, one forward over the whole slice."""
    import torch
    import torch.nn.functional as F
    import transformers

    cls = {"mamba": transformers.MambaForCausalLM, "mamba2": transformers.Mamba2ForCausalLM}[model_type]
    model = cls.from_pretrained(FIXTURES / f"{model_type}-bytes", dtype=torch.float64).eval()
    ids = torch.tensor([list(data)])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, :-1]
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="mean")) / math.log(2)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fp32_bits_per_byte_match_transformers(model_type, fp32_bpb):
    ours = fp32_bpb(model_type)
    ref = transformers_bits_per_byte(model_type, HELDOUT)
    # The fixture is trained: a uniform guess is 8 bits per byte; on this slice the fixtures give 2.94
    # (mamba) and 3.25 (mamba2), a random-weight model of this shape ~8.9.
    assert ref < 4.0, f"{model_type} fixture: held-out {ref:.3f} bits/byte, is it the trained checkpoint?"
    # fp32 export (chunks of 1024 with the state carried) against float64 over the whole slice at
    # once: float32 rounding moves each logit by ~1e-6 relative and the errors average out over 4 KB.
    # Measured: 2.5e-8 (mamba) and 1.1e-7 (mamba2) bits/byte. 1e-5 leaves ~100x for other CPUs and
    # BLAS builds, and is 50x below the smallest quantization effect measured here (int8, 5e-4).
    assert abs(ours - ref) <= 1e-5, f"{model_type}: export {ours:.7f} vs transformers float64 {ref:.7f} bits/byte"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("name, flags, bound", LOWER_PRECISION)
def test_lower_precision_bits_per_byte(model_type, name, flags, bound, exports, fp32_bpb, record_property):
    model = ExportedModel(exports(model_type, name, flags))
    bpb, base = bits_per_byte(model, HELDOUT), fp32_bpb(model_type)
    agreement = greedy_agreement(ExportedModel(exports(model_type, "fp32", [])), model, PROMPTS, 256)
    # Reported, not bounded here except for fp16: greedy decoding of a small model amplifies any
    # near-tie, so agreement is a report (issue 13); the bpb ratio is the bounded quality measure.
    record_property(f"{model_type}-{name}", f"bpb {bpb:.4f} (fp32 {base:.4f}, x{bpb / base:.4f}), "
                                             f"greedy agreement {agreement.fraction:.3f} {agreement.first_divergence}")
    print(f"\n{model_type} {name}: held-out {bpb:.4f} bits/byte, fp32 {base:.4f} (x{bpb / base:.4f}); "
          f"greedy agreement with fp32 over 256 tokens {agreement.fraction:.3f}, first divergence {agreement.first_divergence}")
    assert bpb <= bound * base, f"{model_type} {name}: {bpb:.4f} bits/byte > {bound} x fp32 {base:.4f}"
