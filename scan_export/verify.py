"""`scan-export verify`: an export judged against a float64 run of transformers' own implementation.

The referee is the checkpoint run by transformers in float64. Our export's error against it is held
to the error transformers itself makes in the export's precision (float32, or float16 for fp16
exports) against the same float64 run, times MARGIN. A fixed bar cannot be fair: 24 random layers
amplify rounding, so a 130m-shaped random Mamba puts transformers' own float32 logits 4.8e-4 off
float64 (ours 3.4e-4), while a 2-layer model sits near 1e-7. A quantized export is judged the same
way against transformers run on its own weights, dequantized (QUANTIZED below).

Like check.py, this is where torch, transformers and onnxruntime meet; deployments never import it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ScanExportError, read_json_object
from .runtime.generate import DESCRIPTION_FILE, ExportedModel, generate
from .runtime.parity import OutputMismatch, compare

PROMPT_LENGTHS = (1, 7, 64, 100)
# Our error vs float64 may be up to MARGIN × transformers' own error vs float64 on the same output.
# Both are float32 rounding amplified by the same dynamics, so their ratio scatters around 1: measured
# 0.3-2.9 over 56 outputs (logits, states) × 4 input seeds of a 24-layer random Mamba
# (tests/test_verify.py), 3.4e-4 / 4.8e-4 and 5.6e-4 / 4.5e-4 on a 130m-shaped one, 0.6-1.2 for fp16
# exports against transformers fp16. A real bug is far above: one layer's D zeroed gives 100-5000×.
MARGIN = 8.0
# The bar never drops below FLOOR[dtype]: when transformers happens to land within a few ulps of
# float64 (2-layer models: ~1e-7), MARGIN× its error could fail honest rounding. float32: 2e-6 ≈ 17 ulps,
# still ≥ 100× under what a formulation error gives. float16: 2e-3 ≈ 2 ulps (transformers fp16
# itself measures 0.8-2e-3 on tiny models).
FLOOR = {"float32": 2e-6, "float16": 2e-3}
# QUANTIZED: a quantized export (export-model --quantize int8|int4) is judged against transformers run on the
# export's own weights, dequantized (dequantized_weights), with the float32 bar: against the original
# weights no tight bar can hold, and a loose fixed one would hide real bugs. Measured, logits
# l = 1, 7, 64, 100 vs float64, block 32, on the trained tests/fixtures/mamba-bytes:
#   int4 at accuracy level 0-3 (float activations; on CPU 2 and 3 compute as 1): 4.4-7.1e-7 off the
#     dequantized run, as transformers float32 is (3.1-7.0e-7); 0.22-0.33 off the original weights.
#   accuracy level 4 (the default: MatMulNBits rounds its activation to int8 per block) off the
#     dequantized run: 1.6-2.7e-2 (int8 weights), 1.7-2.3e-2 (int4); mamba2-bytes 1.3-2.8e-2, 0.8-2.3e-2;
#     tiny random Mamba / Mamba-2 1.2-3.1e-2; tiny random Jamba (MoE, sharpened weights) 4.4e-2-0.46
#     (int8), 3.7e-2-0.39 (int4). No stated tolerance both holds and catches bugs (one layer's D
#     zeroed moves logits 1e-2-0.5), so level 4 is judged at level 0: the same graph and weights with
#     float activations, the bar unchanged; the as-exported error is printed, not judged (the rounding
#     is onnxruntime's kernel, which the export only selects).
INT8_ACTIVATION_LEVEL = 4


@dataclass(frozen=True)
class Row:
    """One output: ours vs float64, transformers in the export's dtype vs float64, and the bar."""

    ours: OutputMismatch
    theirs: OutputMismatch
    bar: float

    @property
    def name(self) -> str:
        return self.ours.name

    @property
    def rel(self) -> float:
        return self.ours.rel

    @property
    def finite(self) -> bool:
        return self.ours.finite

    @property
    def passed(self) -> bool:
        return self.ours.finite and self.ours.rel <= self.bar

    def line(self) -> str:
        verdict = "ok" if self.passed else ("FAIL (non-finite)" if not self.finite else "FAIL")
        return f"{self.name:<26} {self.ours.rel:>11.2e} {self.theirs.rel:>15.2e} {self.bar:>9.2e}   {verdict}"


@dataclass(frozen=True)
class TokenRow:
    """Greedy tokens of one prompt, judged position by position by the float64 full forward.

    A random model is chaotic: where two logits nearly tie, any rounding (transformers' float32
    included) may pick the other one, and the sequences part for good. So every token we chose is
    fed back (teacher forcing) through the float64 model in one full forward, and each must be that
    forward's argmax or within `tie_tol` of it: twice the bar on these very logits (MARGIN × the
    error of transformers' own full forward on the same tokens, or --rtol), times their largest
    magnitude: the most two logits that each pass that bar can move towards each other."""

    prompt: list[int]
    ours: list[int]
    f64_generate: list[int]  # transformers float64 generate(): cached path, step by step
    theirs_generate: list[int]  # transformers in the export's dtype, generate(); for information
    gaps: list[float]  # per step: float64 logit of its argmax minus float64 logit of our token (≥ 0)
    tie_tol: float
    cached_disagrees_at: int | None  # first step where float64 generate() differs from its own full forward

    @property
    def passed(self) -> bool:
        return all(g <= self.tie_tol for g in self.gaps)

    def line(self, i: int, ref_dtype: str) -> str:
        n = len(self.ours)
        if self.ours == self.f64_generate:
            text = f"greedy prompt {i}: {n} tokens, identical to float64 transformers"
        else:
            k = _first_difference(self.ours, self.f64_generate)
            text = f"greedy prompt {i}: {n} tokens, differ from float64 transformers generate() from step {k}"
            if self.cached_disagrees_at is not None and self.cached_disagrees_at <= k:
                text += (f"; there float64 generate() (cached path) disagrees with its own full forward "
                         f"(step {self.cached_disagrees_at}), judged by the full forward")
        near = [(t, g) for t, g in enumerate(self.gaps) if 0 < g <= self.tie_tol]
        if near:
            text += "; near ties (step: gap) " + ", ".join(f"{t}: {g:.1e}" for t, g in near)
        bad = [(t, g) for t, g in enumerate(self.gaps) if g > self.tie_tol]
        if bad:
            text += (f"\n  FAIL: not the float64 argmax at steps {[t for t, _ in bad]} (worst gap "
                     f"{max(g for _, g in bad):.2e} > tie tolerance {self.tie_tol:.1e})"
                     f"\n  onnxruntime          {self.ours}\n  transformers float64 {self.f64_generate}")
        theirs = ("identical" if self.theirs_generate == self.f64_generate else
                  f"from step {_first_difference(self.theirs_generate, self.f64_generate)}")
        return text + f"\n  (transformers {ref_dtype} generate() vs float64: {theirs})"


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass(frozen=True)
class WeightsRow:
    """A quantized export's weights, each against its checkpoint parameter: the parameter of its shape
    nearest to it, in quantization steps. RTN moves a weight half a step by rounding, one step where a
    block's largest |w| lands on the clipped end of the range; the other parameters of a shape are many
    steps off (≥ 10 on the tiny models), so the nearest is the right one."""

    steps: dict  # MatMulNBits node -> (parameter name or None, worst |dequantized − checkpoint| / step)

    @property
    def passed(self) -> bool:
        return all(off <= 1 + 1e-6 for _, off in self.steps.values())

    def line(self) -> str:
        worst = max((off for _, off in self.steps.values()), default=0.0)
        text = (f"quantized weights: {len(self.steps)} MatMulNBits, each within {worst:.2f} quantization steps "
                "of its checkpoint parameter (RTN: at most 1)")
        bad = [f"{node} ({name or 'no parameter of its shape'}: {off:.3g} steps)"
               for node, (name, off) in self.steps.items() if off > 1 + 1e-6]
        return text + ("   ok" if not bad else "\n  FAIL: not the checkpoint's weights: " + ", ".join(bad))


@dataclass
class VerifyReport:
    logits: list[Row] = field(default_factory=list)
    states: list[Row] = field(default_factory=list)
    tokens: list[TokenRow] = field(default_factory=list)
    ref_dtype: str = "float32"  # the precision transformers runs in for the bar (the export's)
    rtol: float | None = None  # a user's fixed bar; None: MARGIN × transformers' error, at least FLOOR
    notes: list[str] = field(default_factory=list)  # where transformers could not be run as usual
    quantization: dict | None = None  # the export's (scan_export.json): transformers runs its dequantized weights
    weights: WeightsRow | None = None  # a quantized export's weights against the checkpoint's
    as_exported: list[float] = field(default_factory=list)  # accuracy level 4's logits errors, not judged

    @property
    def passed(self) -> bool:
        return (all(r.passed for r in self.logits + self.states) and all(t.passed for t in self.tokens)
                and (self.weights is None or self.weights.passed))

    def bar_rule(self) -> str:
        if self.rtol is not None:
            return f"bar = --rtol {self.rtol:g} (fixed, relative to float64)"
        return (f"bar = max({MARGIN:g} x transformers {self.ref_dtype} error, {FLOOR[self.ref_dtype]:g}); "
                "errors are max|err| / max|float64|")

    def as_exported_line(self, prompt_lengths) -> str:
        errors = ", ".join(f"{e:.1e}" for e in self.as_exported)
        return (f"as exported (accuracy level {INT8_ACTIVATION_LEVEL}, activations rounded to int8): logits "
                f"{errors} off float64 at l = {', '.join(map(str, prompt_lengths))}; not judged (onnxruntime's "
                "kernel rounding; measured 1e-2-3e-2 on small Mambas, up to 0.46 on a tiny random Jamba)")

    def header(self) -> list[str]:
        q = self.quantization
        on = f" on the export's int{q['bits']} weights, dequantized" if q is not None else ""
        if q is not None and q["accuracy_level"] == INT8_ACTIVATION_LEVEL:
            on += (f"; judged at accuracy level 0 (float activations; exported: {INT8_ACTIVATION_LEVEL}, "
                   "int8 activations), the same graph and weights")
        return [f"against transformers float64{on}; {self.bar_rule()}",
                f"output                     ours vs f64  tf-{self.ref_dtype[5:]} vs f64       bar   result"]

    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def format(self) -> str:
        weights = [self.weights.line()] if self.weights is not None else []
        exported = ([self.as_exported_line([r.name[len("logits l="):] for r in self.logits])]
                    if self.as_exported else [])
        return "\n".join(self.header() + weights + self.notes + [r.line() for r in self.logits + self.states]
                         + exported + [t.line(i, self.ref_dtype) for i, t in enumerate(self.tokens)]
                         + [self.verdict()])




def family_of(model_type):
    """The registry's family (None for none): imported here, as the CLI imports this module to build
    its parser, and the family files import torch."""
    from .reference.models.families import get

    return get(model_type)


def __getattr__(name):
    # MOE_MODEL_TYPES: the families whose experts transformers runs eager here (_Referee); a module
    # attribute, so that tests can stub it, filled from the registry on first use
    if name == "MOE_MODEL_TYPES":
        from .reference.models.families import families

        value = globals()[name] = tuple(f.model_type for f in families() if f.moe)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_checkpoint_config(checkpoint_dir, description: dict, export_dir) -> dict:
    """The checkpoint's config.json, refused up front when it cannot be the exported model."""
    path = Path(checkpoint_dir)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ScanExportError(f"--checkpoint {str(path)!r}: expected a Hugging Face checkpoint directory with "
                              f"config.json, got {'a directory without one' if path.is_dir() else 'no such directory'}")
    try:
        cfg = read_json_object(cfg_path)  # the reader export-model used on it: an object, or one line
    except OSError as e:
        raise ScanExportError(f"--checkpoint {str(path)!r}: config.json is not readable ({e})") from None
    source = f"{Path(export_dir) / DESCRIPTION_FILE}"
    got = cfg
    family = family_of(cfg.get("model_type")) if isinstance(cfg, dict) else None
    if family is not None and family.num_layers is not None:
        # a family whose layer count is not num_hidden_layers (Nemotron-H's: its layer pattern's length)
        got = {**cfg, "num_hidden_layers": family.layer_count(cfg)}
    if isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        # a multimodal checkpoint (qwen3_5) exported as its language model: text_config's sizes
        got = {**cfg["text_config"], **got, "num_hidden_layers": got.get("num_hidden_layers")}
    for ours, theirs in (("model_type", "model_type"), ("num_layers", "num_hidden_layers"),
                         ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size")):
        if ours in description and got.get(theirs) != description[ours]:
            raise ScanExportError(f"--checkpoint {str(path)!r}: {theirs} is {got.get(theirs)!r}, expected "
                                  f"{description[ours]!r} (the export's, from {source})")
    return cfg


# transformers' own failures on configs export-model accepts, by a piece of their message: the config
# fields that cause them and why (transformers 5.25, CPU). Other failures are reported without a field.
KNOWN_FAILURES = (
    ("strides should be multiple of 16 bytes", ("intermediate_size", "moe_intermediate_size"),
     "its grouped_mm experts need an expert width that is a multiple of 4 floats"),
    ("get_mask_sizes", ("attn_layer_period", "attn_layer_offset", "layer_types", "layers_block_type"),
     "its cache needs at least one attention layer"),
)


def _diagnosis(error: Exception, cfg: dict) -> str:
    """What transformers said, on one line, after the config fields that cause it where known."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text[:300] + '...' if len(text) > 300 else text}"
    for needle, fields, why in KNOWN_FAILURES:
        if needle in text:
            given = ", ".join(f"{f} {cfg[f]!r}" for f in fields if f in cfg)
            return f"config {given or ' / '.join(fields)}: {why} ({text})"
    return f"a config this transformers does not run; --debug shows where ({text})"


class _Referee:
    """transformers' model for the checkpoint in one dtype. MoE experts run eager: the default,
    torch._grouped_mm, has no float64 kernel, and on CPU its float32 kernel fails unless an expert's
    width is a multiple of 4 floats (transformers' own tests use intermediate_size 37); eager is the
    same arithmetic, one expert at a time. Every forward and generate() takes the cached path until
    it fails for this config, then use_cache=False full forwards (`note` says so); a failure without
    the cache too is transformers' own: a one-line ScanExportError naming the config field and the
    transformers version, never a traceback."""

    def __init__(self, checkpoint_dir, cfg: dict, model_type: str, dtype: str):
        import torch
        import transformers

        self.cfg, self.dtype, self.use_cache, self.note = cfg, dtype, True, None
        cls = getattr(transformers, family_of(model_type).hf_class)
        kw = {"experts_implementation": "eager"} if model_type in sys.modules[__name__].MOE_MODEL_TYPES else {}
        self.model = self._call("load the checkpoint", lambda: cls.from_pretrained(
            str(checkpoint_dir), dtype=getattr(torch, dtype), **kw).eval())

    def swap_in(self, weights: dict) -> None:
        """Replace parameters by name with the given arrays (a quantized export's dequantized weights)."""
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(torch.from_numpy(w))

    def _call(self, what: str, fn):
        import transformers

        try:
            return fn()
        except Exception as e:  # raised inside transformers / torch, on inputs an export accepts
            raise ScanExportError(f"--checkpoint: transformers {transformers.__version__} {self.dtype} cannot "
                                  f"{what}: {_diagnosis(e, self.cfg)}") from e

    def _cached(self, what: str, cached, uncached):
        import torch
        import transformers

        with torch.no_grad():
            if self.use_cache:
                try:
                    return cached()
                except Exception as e:
                    result = self._call(what, uncached)  # raises when transformers cannot run it at all
                    self.use_cache = False
                    self.note = (f"note: transformers {transformers.__version__}'s cached path fails here, "
                                 f"{_diagnosis(e, self.cfg)}; judged by use_cache=False full forwards, "
                                 "transformers' states not compared")
                    return result
            return self._call(what, uncached)

    def forward(self, ids):
        """(logits, cache) of one forward from an empty state; cache None on the use_cache=False path."""
        out = self._cached("run a forward", lambda: self.model(ids, use_cache=True),
                           lambda: self.model(ids, use_cache=False))
        return out.logits, (out.cache if self.use_cache else None)

    def generate(self, prompt: list[int], n_tokens: int, eos) -> list[int]:
        import torch

        ids = torch.tensor([prompt])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False)
        out = self._cached("generate", lambda: self.model.generate(ids, use_cache=True, **kw),
                           lambda: self.model.generate(ids, use_cache=False, **kw))[0, len(prompt):].tolist()
        return out[: out.index(eos) + 1] if eos is not None and eos in out else out


def dequantized_weights(model_file) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every MatMulNBits weight of a quantized export, dequantized as onnxruntime reads it: (node name,
    W (N, K) float64, each weight's quantization step (N, K)). Symmetric, no zero points: the zero point
    is 2^(bits−1); 4-bit values are packed two a byte, the first in the low nibble. A tied embedding is
    one of them (its lm_head reads the table the input GatherBlockQuantized reads)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_file))
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n, k, bits = a["N"], a["K"], a["bits"]
        q = numpy_helper.to_array(inits[node.input[1]])  # (N, k_blocks, block_size · bits / 8) uint8
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(n, -1)
        if bits == 4:
            q = np.stack([q & 15, q >> 4], axis=-1).reshape(n, q.shape[1], -1)
        w = (q.astype(np.float64) - 2 ** (bits - 1)) * scales[:, :, None]
        step = np.repeat(np.abs(scales), a["block_size"], axis=1)
        out.append((node.name, w.reshape(n, -1)[:, :k], step[:, :k]))
    return out


def _match_dequantized(model, quantized) -> tuple[dict[str, np.ndarray], WeightsRow]:
    """({parameter name: dequantized W} for the weights that match, the row judging all of them)."""
    params = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    found, steps = {}, {}
    for node, w, step in quantized:
        off = {name: float(np.max(np.abs(p - w) / step)) for name, p in params.items() if p.shape == w.shape}
        name = min(off, key=off.get, default=None)
        steps[node] = (name, off.get(name, float("inf")))
        if name is not None and off[name] <= 1 + 1e-6:
            found[name] = w
    return found, WeightsRow(steps)


def _hf_states(cache, description: dict) -> list[np.ndarray]:
    """transformers' cache in our state order and layout, float64, as the export's family reads it."""
    return family_of(description["model_type"]).hf_states(cache, description)


def _row(name: str, ours, theirs, f64, bar: float | None, floor: float) -> Row:
    mine, ref = compare(name, ours, f64), compare(name, theirs, f64)
    return Row(mine, ref, bar if bar is not None else max(MARGIN * ref.rel, floor))


def verify_export(export_dir, checkpoint_dir, **kw) -> VerifyReport:
    """rtol: a fixed bar on each output's relative error vs float64; None (default): MARGIN × the error
    transformers makes in the export's dtype, at least FLOOR. transformers stays quiet meanwhile: its
    "Loading weights" bars and "falling back to its reference PyTorch implementation" notices say
    nothing a user of verify can act on."""
    import transformers

    log = transformers.utils.logging
    verbosity = log.get_verbosity()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="scan-export-verify-") as workdir:
            return _verify_export(export_dir, checkpoint_dir, workdir=Path(workdir), **kw)
    finally:
        log.set_verbosity(verbosity)
        log.enable_progress_bar()


def _float_activation_copy(export_dir, model_file: str, workdir: Path) -> Path:
    """A copy of a quantized export with every MatMulNBits at accuracy level 0 (float activations):
    the same graph and weights (an external data file is copied as it is)."""
    import onnx

    out = workdir / "float-activations"
    shutil.copytree(export_dir, out)
    model = onnx.load(str(out / model_file), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    onnx.save(model, str(out / model_file))
    return out


def _verify_export(export_dir, checkpoint_dir, *, prompt_lengths=PROMPT_LENGTHS, n_tokens: int = 32,
                   n_prompts: int = 3, provider: str = "cpu", seed: int = 0, rtol: float | None = None,
                   say=None, workdir: Path) -> VerifyReport:
    """say: called with each line of the report as soon as it is known (the CLI prints them: a
    130m-shaped model takes minutes, which must not pass in silence)."""
    import torch

    say = say or (lambda line: None)
    if rtol is not None and not rtol > 0:
        raise ScanExportError(f"--rtol must be > 0, got {rtol!r}")
    ours = ExportedModel(export_dir, provider)
    desc = ours.description
    cfg = read_checkpoint_config(checkpoint_dir, desc, export_dir)
    model_type, dtype = desc["model_type"], desc["dtype"]
    f64, theirs = (_Referee(checkpoint_dir, cfg, model_type, d) for d in ("float64", dtype))
    report = VerifyReport(ref_dtype=dtype, rtol=rtol, quantization=desc.get("quantization"))
    for line in report.header():
        say(line)
    if report.quantization is not None:  # a weight that is not the checkpoint's stays out (and fails its row)
        weights, report.weights = _match_dequantized(f64.model, dequantized_weights(
            ours.export_dir / desc["model_file"]))
        f64.swap_in(weights)
        theirs.swap_in(weights)
        say(report.weights.line())
    exported = None  # the export as written, where `ours` is its float-activation copy
    if report.quantization is not None and report.quantization["accuracy_level"] == INT8_ACTIVATION_LEVEL:
        copy = _float_activation_copy(export_dir, desc["model_file"], workdir)
        exported, ours = ours, ExportedModel(copy, provider)

    def add(rows: list, row, line: str):
        rows.append(row)
        for note in {m.note: None for m in (f64, theirs) if m.note is not None}:  # one line for both
            if note not in report.notes:
                report.notes.append(note)
                say(note)
        say(line)

    floor = FLOOR[dtype]
    rng = np.random.default_rng(seed)
    vocab = ours.vocab_size
    for length in prompt_lengths:
        ids = rng.integers(0, vocab, size=(2, length))
        logits, state = ours.forward(ids, ours.zero_state(2))
        ref, ref_cache = f64.forward(torch.from_numpy(ids))
        got, got_cache = theirs.forward(torch.from_numpy(ids))
        row = _row(f"logits l={length}", logits, got.double().numpy(), ref.numpy(), rtol, floor)
        add(report.logits, row, row.line())
        if exported is not None:
            as_exported = exported.forward(ids, exported.zero_state(2))[0]
            report.as_exported.append(compare("logits", as_exported, ref.numpy()).rel)
        # States after the longest prefill, where both transformers runs kept a cache.
        if length == max(prompt_lengths) and ref_cache is not None and got_cache is not None:
            ref_states, their_states = _hf_states(ref_cache, desc), _hf_states(got_cache, desc)
            for name, a, b, c in zip(ours.state_outputs, state, their_states, ref_states):
                row = _row(name, a, b, c, rtol, floor)
                add(report.states, row, row.line())

    if exported is not None:
        say(report.as_exported_line(prompt_lengths))
    eos = desc.get("eos_token_id")
    for _ in range(n_prompts):
        prompt = rng.integers(0, vocab, size=int(rng.integers(2, 12))).tolist()
        (mine,) = generate(ours, [prompt], n_tokens, stop_token_id=eos)
        f64_tokens, theirs_tokens = (m.generate(prompt, n_tokens, eos) for m in (f64, theirs))
        row = _judge_tokens(f64, theirs, prompt, mine, f64_tokens, theirs_tokens, rtol, floor)
        add(report.tokens, row, row.line(len(report.tokens), dtype))
    return report


def _full_forward_logits(model: _Referee, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The logits that chose each of `tokens`, from one full forward, as float64: (n, V)."""
    import torch

    return model.forward(torch.tensor([prompt + tokens[:-1]]))[0][0, len(prompt) - 1:].double().numpy()


def _judge_tokens(f64, theirs, prompt, mine, f64_tokens, theirs_tokens, rtol, floor) -> TokenRow:
    gaps, tie_tol = [], 0.0
    if mine:
        logits = _full_forward_logits(f64, prompt, mine)
        gaps = (logits.max(axis=-1) - logits[np.arange(len(mine)), mine]).tolist()
        their_rel = compare("tokens", _full_forward_logits(theirs, prompt, mine), logits).rel
        bar = rtol if rtol is not None else max(MARGIN * their_rel, floor)
        tie_tol = 2 * bar * float(np.abs(logits).max())
    # Does transformers' float64 generate() (cached, step by step) agree with its own full forward?
    disagree = None
    if f64_tokens:
        own = _full_forward_logits(f64, prompt, f64_tokens)
        disagree = next((t for t, tok in enumerate(f64_tokens) if own[t].max() > own[t][tok]), None)
    return TokenRow(prompt, mine, f64_tokens, theirs_tokens, gaps, tie_tol, disagree)
