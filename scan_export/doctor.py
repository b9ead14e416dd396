"""`scan-export doctor`: what this machine's onnxruntime can do, checked by running it.

Reports the versions and providers, then for each provider asked for (default: every one of cpu
and cuda that this onnxruntime build has): `check` on an op model in both scan forms (against the
float64 reference), and a short greedy generation from a tiny export in both scan forms, with
timings, and whether the tokens agree across forms and providers.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

from .errors import ScanExportError

FORMS = ("sequential", "chunked")
PROMPT = [1, 2, 3, 4, 5]


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except ImportError:
        return "not installed"


def environment() -> list[str]:
    import onnxruntime as ort

    lines = [f"{m:<20} {_version(m)}" for m in ("onnxruntime", "onnx", "torch", "transformers", "onnxruntime_genai")]
    lines.append(f"{'ort build device':<20} {ort.get_device()}")
    lines.append(f"{'ort providers':<20} {', '.join(ort.get_available_providers())}")
    return lines


def run_doctor(providers=None, tokens: int = 16, say=print) -> bool:
    """Print the report line by line through say(); True when every check passed."""
    from .check import check_scan_model
    from .onnx.export import save_model
    from .onnx.scan_model import ScanModelSpec, build_scan_model
    from .runtime.session import PROVIDERS, available_providers

    for line in environment():
        say(line)
    have = [p for p, name in PROVIDERS.items() if name in available_providers()]
    providers = list(providers or have)
    missing = [p for p in providers if p not in have]
    if missing:
        raise ScanExportError(f"--provider {missing[0]}: this onnxruntime build has no {PROVIDERS[missing[0]]} "
                              f"(available: {', '.join(available_providers())})")
    ok = True
    tokens_seen = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exports = _tiny_exports(tmp, say)
        for provider in providers:
            for form in FORMS:
                path = save_model(build_scan_model(ScanModelSpec(dim=64, dstate=16, groups=2, scan_form=form)),
                                  tmp / f"scan-{form}.onnx")
                t0 = time.perf_counter()
                rows = check_scan_model(path, provider=provider)
                worst = max(max(r.out_rel, r.state_rel) for r in rows)
                passed = all(r.passed for r in rows)
                ok &= passed
                say(f"check     {provider:<5} {form:<10} {sum(r.passed for r in rows)}/{len(rows)} cases, worst rel "
                    f"{worst:.1e} vs float64, {time.perf_counter() - t0:.1f} s: {'ok' if passed else 'FAIL'}")
            for form, export_dir in exports.items():
                got, ms = _generate(export_dir, provider, tokens)
                tokens_seen[provider, form] = got
                say(f"generate  {provider:<5} {form:<10} {tokens} greedy tokens, {ms:.2f} ms/token (incl. prefill)")
    if tokens_seen:
        agree = len({tuple(t) for t in tokens_seen.values()}) == 1
        ok &= agree
        say(f"tokens    {'identical' if agree else 'DIFFER'} across {len(tokens_seen)} provider x form runs")
    say("PASS" if ok else "FAIL")
    return ok


def _tiny_exports(root: Path, say) -> dict:
    try:
        from .tiny import make_tiny_checkpoint
    except ImportError:
        return {}
    try:
        ckpt = make_tiny_checkpoint(root / "ckpt", "mamba")
    except ImportError as e:
        say(f"generate  skipped: {e}")
        return {}
    from .onnx.model_export import export_model

    return {form: export_model(ckpt, root / f"export-{form}", scan_form=form) for form in FORMS}


def _generate(export_dir, provider: str, tokens: int) -> tuple[list[int], float]:
    from .runtime.generate import ExportedModel, generate

    model = ExportedModel(export_dir, provider)
    generate(model, [PROMPT], 2)  # warm-up: the first run allocates
    t0 = time.perf_counter()
    (got,) = generate(model, [PROMPT], tokens)
    return got, 1e3 * (time.perf_counter() - t0) / tokens
