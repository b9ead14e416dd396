"""`scan-export bench ssd`: the Mamba-2 SSD scan, eager and onnxruntime (both lowerings), side by side."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .common import Bench, median_ms

SSD_SHAPE = (1, 24, 64, 128, 2048)  # (batch, heads, headdim, dstate, seqlen)


def bench_ssd(shape=SSD_SHAPE, regime: str = "init", repeats: int = 5, groups: int = 1) -> dict:
    """Mamba-2 SSD scan: eager sequential, eager chunked, onnxruntime CPU (portable lowering)."""
    import torch

    from ..onnx.export import save_model
    from ..onnx.ssd_model import SSDModelSpec, build_ssd_model
    from ..reference.regimes import make_ssd_inputs
    from ..reference.ssd import ssd_scan_chunked, ssd_scan_ref
    from ..runtime import make_session

    b, h, p, n, l = shape
    kw = make_ssd_inputs(regime, b, l, h, p, groups, n)
    feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for lowering, target in (("portable", "portable"), ("native", "ort-1.32")):
            spec = SSDModelSpec(heads=h, groups=groups, with_initial_states=False, lowering=lowering)
            path = save_model(build_ssd_model(spec, target=target), Path(tmp) / f"ssd-{lowering}.onnx")
            sessions[lowering] = make_session(path, "cpu")
        impls = {
            "eager sequential (ssd_scan_ref)": lambda: ssd_scan_ref(**kw),
            "eager scan_export chunked (T=64)": lambda: ssd_scan_chunked(**kw),
            "onnxruntime CPU, portable lowering (Loop, T=64)": lambda: sessions["portable"].run(["y"], feeds),
            "onnxruntime CPU, native lowering (LinearAttention)": lambda: sessions["native"].run(["y"], feeds),
        }
        with torch.inference_mode():
            times = {k: median_ms(fn, max(2, repeats // 2) if "sequential" in k else repeats) for k, fn in impls.items()}
    base = times["eager sequential (ssd_scan_ref)"]
    return {"regime": regime, "shape": dict(zip(("batch", "heads", "headdim", "dstate", "seqlen"), shape)),
            "median_ms": times, "speedup_vs_sequential": {k: base / v for k, v in times.items()}}


def format_ssd_bench(results: dict) -> str:
    s = results["shape"]
    lines = [f"SSD scan, regime={results['regime']}, B{s['batch']}·H{s['heads']}·P{s['headdim']}·N{s['dstate']}·L{s['seqlen']}",
             f"  {'implementation':<48} {'median ms':>10} {'× vs sequential':>16}"]
    for k, v in results["median_ms"].items():
        lines.append(f"  {k:<48} {v:>10.1f} {results['speedup_vs_sequential'][k]:>16.2f}")
    return "\n".join(lines)


def add_arguments(p, kinds) -> None:
    p.add_argument("--regime", default="init", choices=["easy", "init", "heavy"], help="the input regime")
    p.add_argument("--repeats", type=kinds["repeats"], default=5, help="timed runs per contender")


def run(args) -> dict:
    return bench_ssd(regime=args.regime, repeats=args.repeats)


BENCH = Bench("ssd", "time the Mamba-2 SSD scan implementations side by side", add_arguments, run, format_ssd_bench,
              old_flag="--ssd")
