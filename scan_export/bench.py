"""`scan-export bench`: side-by-side timings measured in one run, reported as medians and ratios.

Machines here are noisy (±30% across processes), so only ratios between rows of the same run mean
anything; absolute milliseconds are printed for context.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

SCAN_SHAPES = ((1, 1536, 16, 2048), (4, 768, 16, 512))  # (batch, dim, dstate, seqlen)
BASELINE = "eager mamba-mini chunked (T=64)"


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_scan(shapes=SCAN_SHAPES, regime: str = "init", repeats: int = 5, chunk_size: int | None = None) -> dict:
    import torch

    from .onnx.export import save_model
    from .onnx.scan_model import ScanModelSpec, build_scan_model
    from .reference import DEFAULT_CHUNK_SIZE, selective_scan_chunked, selective_scan_ref
    from .reference.mamba_mini import mamba_mini_chunked_scan
    from .reference.regimes import make_scan_inputs
    from .runtime import make_session

    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    results = {"regime": regime, "chunk_size": chunk_size, "torch_threads": torch.get_num_threads(), "shapes": []}
    spec = ScanModelSpec(with_z=False, with_initial_state=False, chunk_size=chunk_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(build_scan_model(spec), Path(tmp) / "scan.onnx")
        session = make_session(path, "cpu")
        for b, d, n, l in shapes:
            kw = make_scan_inputs(regime, b, d, n, l, 1, with_z=False)
            kw.pop("z"), kw.pop("initial_state")
            feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
            impls = {
                "eager sequential (selective_scan_ref)": lambda: selective_scan_ref(**kw),
                BASELINE: lambda: mamba_mini_chunked_scan(**kw),
                f"eager scan_export chunked (T={chunk_size})": lambda: selective_scan_chunked(**kw, chunk_size=chunk_size),
                f"onnxruntime CPU, scan_export graph (T={chunk_size})": lambda: session.run(["out"], feeds),
            }
            with torch.inference_mode():
                times = {name: median_ms(fn, max(2, repeats // 2) if "sequential" in name else repeats)
                         for name, fn in impls.items()}
            base = times[BASELINE]
            results["shapes"].append({
                "shape": {"batch": b, "dim": d, "dstate": n, "seqlen": l},
                "median_ms": times,
                "speedup_vs_mamba_mini": {k: base / v for k, v in times.items()},
                "speedup_vs_sequential": {k: times["eager sequential (selective_scan_ref)"] / v for k, v in times.items()},
            })
    return results


def format_scan_bench(results: dict) -> str:
    lines = [f"selective scan, regime={results['regime']}, torch threads={results['torch_threads']}"]
    for entry in results["shapes"]:
        s = entry["shape"]
        lines.append(f"\nB{s['batch']}·D{s['dim']}·N{s['dstate']}·L{s['seqlen']}")
        lines.append(f"  {'implementation':<52} {'median ms':>10} {'× vs mamba-mini':>16} {'× vs sequential':>16}")
        for name, ms in entry["median_ms"].items():
            lines.append(f"  {name:<52} {ms:>10.1f} {entry['speedup_vs_mamba_mini'][name]:>16.2f} "
                         f"{entry['speedup_vs_sequential'][name]:>16.2f}")
    return "\n".join(lines)


def write_json(results: dict, path) -> None:
    Path(path).write_text(json.dumps(results, indent=2))
