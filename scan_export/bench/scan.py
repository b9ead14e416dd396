"""`scan-export bench scan`: the Mamba-1 selective scan, eager and onnxruntime, side by side (also what a
plain `scan-export bench` runs)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .common import Bench, interleaved_ms, median_ms

SCAN_SHAPES = ((1, 1536, 16, 2048), (4, 768, 16, 512))  # (batch, dim, dstate, seqlen)
BASELINE = "eager mamba-mini chunked (T=64)"


PLAIN = "onnxruntime CPU, plain torch.onnx.export (Scan)"
WRAPPER = "onnxruntime CPU, scan_export.onnx.export (Scan)"
ROUTE_INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def export_routes(tmp) -> dict:
    """A module calling selective_scan_fn (the bench's options: D, delta_bias, softplus; B, C (b, n, l)),
    exported by the plain torch.onnx.export(dynamo=True) and by our wrapper -> {row name: session}."""
    import torch

    from .. import selective_scan_fn
    from ..onnx.export import export, save_model
    from ..reference.regimes import make_scan_inputs
    from ..runtime import make_session

    class Scan(torch.nn.Module):
        def forward(self, u, delta, A, B, C, D, delta_bias):
            return selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, True)

    kw = make_scan_inputs("init", 1, 8, 4, 16, 1, with_z=False)
    args = tuple(kw[k] for k in ROUTE_INPUTS)
    dyn = torch.export.Dim.DYNAMIC
    bl = {0: dyn, 2: dyn}
    dims = {0: dyn, 1: dyn}  # d and n too: the bench's shapes differ from the example's
    shapes = (bl | {1: dyn}, bl | {1: dyn}, dims, bl | {1: dyn}, bl | {1: dyn}, {0: dyn}, {0: dyn})
    plain = torch.onnx.export(Scan(), args, dynamo=True, dynamic_shapes=shapes, verbose=False).model_proto
    wrapper = export(Scan(), args, dynamic_shapes=shapes)
    return {name: make_session(save_model(model, Path(tmp) / f"{i}.onnx"), "cpu")
            for i, (name, model) in enumerate(((WRAPPER, wrapper), (PLAIN, plain)))}


def bench_scan(shapes=SCAN_SHAPES, regime: str = "init", repeats: int = 5, chunk_size: int | None = None,
               plain: bool = False) -> dict:
    """plain: also time a module's graph from the plain torch.onnx.export against our wrapper's, in turn."""
    import torch

    from ..onnx.export import save_model
    from ..onnx.scan_model import ScanModelSpec, build_scan_model
    from ..reference import DEFAULT_CHUNK_SIZE, selective_scan_chunked, selective_scan_ref
    from ..reference.mamba_mini import mamba_mini_chunked_scan
    from ..reference.regimes import make_scan_inputs
    from ..runtime import make_session

    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    results = {"regime": regime, "chunk_size": chunk_size, "torch_threads": torch.get_num_threads(), "shapes": []}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for form in ("sequential", "chunked"):
            spec = ScanModelSpec(with_z=False, with_initial_state=False, chunk_size=chunk_size, scan_form=form)
            sessions[form] = make_session(save_model(build_scan_model(spec), Path(tmp) / f"scan-{form}.onnx"), "cpu")
        routes = export_routes(tmp) if plain else {}
        for b, d, n, l in shapes:
            kw = make_scan_inputs(regime, b, d, n, l, 1, with_z=False)
            kw.pop("z"), kw.pop("initial_state")
            feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
            impls = {
                "eager sequential (selective_scan_ref)": lambda: selective_scan_ref(**kw),
                BASELINE: lambda: mamba_mini_chunked_scan(**kw),
                f"eager scan_export chunked (T={chunk_size})": lambda: selective_scan_chunked(**kw, chunk_size=chunk_size),
                "onnxruntime CPU, sequential form (Scan)": lambda: sessions["sequential"].run(["out"], feeds),
                f"onnxruntime CPU, chunked form (Loop, T={chunk_size})": lambda: sessions["chunked"].run(["out"], feeds),
            }
            with torch.inference_mode():
                times = {name: median_ms(fn, max(2, repeats // 2) if "sequential" in name else repeats)
                         for name, fn in impls.items()}
            # The two export routes alternate run by run, so the machine's drift lands on both.
            ordered = [feeds[k] for k in ROUTE_INPUTS]
            times |= interleaved_ms({name: (lambda s=s, f=dict(zip([i.name for i in s.get_inputs()], ordered)): s.run(None, f))
                                     for name, s in routes.items()}, repeats) if routes else {}
            base = times[BASELINE]
            results["shapes"].append({
                "shape": {"batch": b, "dim": d, "dstate": n, "seqlen": l},
                "median_ms": times,
                "speedup_vs_mamba_mini": {k: base / v for k, v in times.items()},
                "speedup_vs_sequential": {k: times["eager sequential (selective_scan_ref)"] / v for k, v in times.items()},
                **({"plain_over_wrapper": times[PLAIN] / times[WRAPPER]} if routes else {}),
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
        if "plain_over_wrapper" in entry:
            lines.append(f"  plain export / wrapper export time: {entry['plain_over_wrapper']:.2f}x (the two timed in turn)")
    return "\n".join(lines)


def add_arguments(p, kinds) -> None:
    p.add_argument("--regime", default="init", choices=["easy", "init", "heavy"], help="the input regime")
    p.add_argument("--repeats", type=kinds["repeats"], default=5, help="timed runs per contender")
    p.add_argument("--chunk-size", type=kinds["chunk_size"], default=None,
                   help=f"the chunked form's T, at most {kinds['max_chunk_size']} (default: 16)")
    p.add_argument("--plain", action="store_true",
                   help="also time a module exported by plain torch.onnx.export against our export()")


def run(args) -> dict:
    return bench_scan(regime=args.regime, repeats=args.repeats, chunk_size=args.chunk_size, plain=args.plain)


BENCH = Bench("scan", "time the selective-scan implementations side by side", add_arguments, run, format_scan_bench)
