"""The bench part of tools/gpu_check.sh: the scan bench and a 130m prefill/decode on one onnxruntime
provider, against torch eager on the same device and the weight-streaming floor.

`scan-export bench` (and `bench --model`) time onnxruntime on CPU only; this runs the same
contenders and the same measurements (scan_export.bench: interleaved_ms, median_ms, the bench's
scan shapes and model configs, its decode statistic: the median of per-token times) with the
onnxruntime side on --provider and torch on the matching device. On CUDA the scan's inputs are
bound to the GPU once (IO binding) and decode keeps the state on the GPU (runtime.binding's
BoundDecoder, what `generate --provider cuda` uses), so no row times host<->device copies that the
other side does not make. With --provider cpu it is the CPU bench again (tools/gpu_check.sh's dry run).

    PYTHONPATH=$PWD python3 tools/gpu_bench.py --provider cuda [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth_gbs(provider: str, megabytes: int) -> tuple[float, str]:
    """Weight-streaming bandwidth the way a decode step streams weights: (1, K) @ (K, N), reading the
    (K, N) matrix once per call. CPU: bench.measure_bandwidth_gbs (onnxruntime's MatMul). CUDA: the
    same product in torch on the GPU (both libraries end in a cuBLAS GEMV there)."""
    from scan_export.bench.common import median_ms
    from scan_export.bench.model import measure_bandwidth_gbs

    if provider == "cpu":
        return measure_bandwidth_gbs(megabytes), "onnxruntime CPU MatMul (1,K)@(K,N)"
    import torch

    k = 4096
    w = torch.ones((k, megabytes * 2**20 // (4 * k)), device="cuda")
    x = torch.ones((1, k), device="cuda")

    def f():
        x @ w
        sync("cuda")

    ms = median_ms(f, 10, warmup=2)
    return w.numel() * 4 / (ms / 1e3) / 1e9, "torch CUDA matmul (1,K)@(K,N)"


def ort_runner(session, feeds: dict, outputs: list[str], provider: str):
    """A no-argument callable running session once. CUDA: inputs uploaded once and bound, outputs
    left on the GPU (run_with_iobinding returns when the run is done)."""
    if provider == "cpu":
        return lambda: session.run(outputs, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    held = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
    for k, v in held.items():
        binding.bind_ortvalue_input(k, v)
    for name in outputs:
        binding.bind_output(name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def bench_scan(provider: str, shapes, repeats: int) -> list[dict]:
    """bench.bench_scan's contenders (minus the plain-export pair) with onnxruntime on provider and
    the eager ones on the same device."""
    import torch

    from scan_export.bench.common import median_ms
    from scan_export.bench.scan import BASELINE
    from scan_export.onnx.export import save_model
    from scan_export.onnx.scan_model import ScanModelSpec, build_scan_model
    from scan_export.reference import DEFAULT_CHUNK_SIZE, selective_scan_chunked, selective_scan_ref
    from scan_export.reference.mamba_mini import mamba_mini_chunked_scan
    from scan_export.reference.regimes import make_scan_inputs
    from scan_export.runtime import make_session

    device = "cuda" if provider == "cuda" else "cpu"
    T = DEFAULT_CHUNK_SIZE
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for form in ("sequential", "chunked"):
            spec = ScanModelSpec(with_z=False, with_initial_state=False, chunk_size=T, scan_form=form)
            sessions[form] = make_session(save_model(build_scan_model(spec), Path(tmp) / f"scan-{form}.onnx"), provider)
        for b, d, n, l in shapes:
            kw = make_scan_inputs("init", b, d, n, l, 1, with_z=False)
            kw.pop("z"), kw.pop("initial_state")
            feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
            dkw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

            def eager(fn, **extra):
                def f():
                    fn(**dkw, **extra)
                    sync(device)
                return f

            impls = {
                f"torch {device} eager sequential (selective_scan_ref)": eager(selective_scan_ref),
                f"torch {device} {BASELINE}": eager(mamba_mini_chunked_scan),
                f"torch {device} eager scan_export chunked (T={T})": eager(selective_scan_chunked, chunk_size=T),
                f"onnxruntime {provider}, sequential form (Scan)": ort_runner(sessions["sequential"], feeds, ["out"], provider),
                f"onnxruntime {provider}, chunked form (Loop, T={T})": ort_runner(sessions["chunked"], feeds, ["out"], provider),
            }
            with torch.inference_mode():
                times = {k: median_ms(f, max(2, repeats // 2) if "sequential" in k else repeats) for k, f in impls.items()}
            rows.append({"shape": f"B{b}·D{d}·N{n}·L{l}", "median_ms": times})
    return rows


def bench_model(provider: str, model_type: str, config: str, prefill_len: int, decode_tokens: int, repeats: int,
                bw: float) -> dict:
    """bench.bench_model's measurement with onnxruntime on provider and transformers eager on the same
    device: prefill (last logits), decode ms/token (median of per-token times), floor = weights / bw."""
    import torch
    import transformers

    from scan_export import tiny
    from scan_export.bench.common import interleaved_ms
    from scan_export.reference.models.families import get as family_of
    from scan_export.onnx.model_export import export_model
    from scan_export.runtime.binding import BoundDecoder, PlainDecoder
    from scan_export.runtime.generate import ExportedModel

    device = "cuda" if provider == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        params = family_of(model_type).bench_configs[config]
        ckpt = tiny.make_tiny_checkpoint(Path(tmp) / "ckpt", model_type, sharpen=False, **params)
        ours = ExportedModel(export_model(ckpt, Path(tmp) / "export"), provider)
        hf = getattr(transformers, family_of(model_type).hf_class).from_pretrained(str(ckpt)).eval().to(device)
        ids = np.random.default_rng(0).integers(0, ours.vocab_size, (1, prefill_len))
        ids_t = torch.from_numpy(ids).to(device)

        def hf_prefill():
            with torch.inference_mode():
                hf(ids_t, logits_to_keep=1)
            sync(device)

        prefill = interleaved_ms({"torch": hf_prefill,
                                  "onnxruntime": lambda: ours.forward(ids, ours.zero_state(1), logits_to_keep=1)},
                                 repeats)

        def ort_steps():
            # The decoder generate() uses: state kept on the device on CUDA, numpy on CPU.
            logits, state = ours.forward(ids[:, :8], ours.zero_state(1), logits_to_keep=1)
            decoder = (BoundDecoder if ours.io_binding else PlainDecoder)(ours, state)
            tok, times = logits[:, -1].argmax(-1), []
            for _ in range(decode_tokens):
                t0 = time.perf_counter()
                tok = decoder(tok).argmax(-1)
                times.append(time.perf_counter() - t0)
            return times

        def hf_steps():
            # As bench/model.py: transformers' own generate loop, a streamer stamping each token (synchronised
            # first, so that a stamp is the token's real arrival on CUDA).
            stamps = []

            class Stamp(transformers.generation.streamers.BaseStreamer):
                def put(self, value):
                    sync(device)
                    stamps.append(time.perf_counter())

                def end(self):
                    pass

            with torch.inference_mode():
                hf.generate(ids_t[:, :8], max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1,
                            do_sample=False, streamer=Stamp())
            return list(np.diff(stamps[1:]))

        ort_steps(), hf_steps()  # warm-up
        t_ort, t_hf = [], []
        for _ in range(repeats):
            t_hf += hf_steps()
            t_ort += ort_steps()
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        decode = {"torch": 1e3 * float(np.median(t_hf)), "onnxruntime": 1e3 * float(np.median(t_ort))}
        floor = weight_bytes / (bw * 1e9) * 1e3
    return {"model": f"{model_type} {config}", "params_m": round(weight_bytes / 4e6, 1), "prefill_len": prefill_len,
            "decode_tokens": decode_tokens, "prefill_ms": prefill, "decode_ms_per_token": decode,
            "decode_floor_ms": floor}


def summarize(out: dict) -> str:
    """A few lines for gpu_check.sh's summary: bandwidth, each scan row, each model's prefill/decode."""
    lines = [f"bandwidth {out['bandwidth_gbs']:.1f} GB/s ({out['bandwidth_by']})"]
    for s in out["scan"]:
        short = ("eager sequential", "eager mamba-mini", "eager chunked", "ort Scan", "ort Loop")  # impls' order
        lines.append(f"scan {s['shape']} ms: " + ", ".join(f"{n} {v:.1f}" for n, v in zip(short, s["median_ms"].values())))
    for m in out["models"]:
        p, d = m["prefill_ms"], m["decode_ms_per_token"]
        lines.append(f"{m['model']} on {out['provider']}: prefill {m['prefill_len']} tokens torch {p['torch']:.1f} / "
                     f"ort {p['onnxruntime']:.1f} ms; decode torch {d['torch']:.2f} / ort {d['onnxruntime']:.2f} "
                     f"ms/token; floor {m['decode_floor_ms']:.3f} ms/token")
    return "\n".join(lines)


def main(argv=None) -> int:
    from scan_export.bench.scan import SCAN_SHAPES

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summarize"]:  # gpu_check.sh: the summary of a --json written before
        print(summarize(json.loads(Path(argv[1]).read_text())))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes and models, one rep: checks the script, times nothing")
    p.add_argument("--model-types", default="mamba", help="comma-separated, with bench shapes (their Family.bench_configs)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.provider == "cuda":
        import onnxruntime as ort
        import torch

        if hasattr(ort, "preload_dlls"):  # cuDNN / cuBLAS from the nvidia pip wheels (docs/benchmarks.md, "GPU check")
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
            print(f"gpu_bench: CUDA missing (onnxruntime: {ort.get_available_providers()}, torch.cuda: "
                  f"{torch.cuda.is_available()})", file=sys.stderr)
            return 1
    quick = args.quick
    shapes = ((1, 64, 16, 128),) if quick else SCAN_SHAPES
    config, prefill_len, decode_tokens, repeats = ("tiny", 16, 4, 1) if quick else ("130m", 512, 32, 3)
    bw, how = bandwidth_gbs(args.provider, 64 if quick else 512)
    out = {"provider": args.provider, "quick": quick, "bandwidth_gbs": bw, "bandwidth_by": how,
           "scan": bench_scan(args.provider, shapes, 2 if quick else 5), "models": []}
    print(f"bandwidth {bw:.1f} GB/s ({how})")
    for row in out["scan"]:
        print(f"scan {row['shape']} (regime init)")
        for k, v in row["median_ms"].items():
            print(f"  {k:<58} {v:>10.2f} ms")
    for t in (t.strip() for t in args.model_types.split(",") if t.strip()):
        m = bench_model(args.provider, t, config, prefill_len, decode_tokens, repeats, bw)
        out["models"].append(m)
        pf, dc = m["prefill_ms"], m["decode_ms_per_token"]
        print(f"model {m['model']} ({m['params_m']} M params), prefill {prefill_len} tokens, decode {decode_tokens}")
        print(f"  prefill ms (last logits)  torch {pf['torch']:.1f}  onnxruntime {pf['onnxruntime']:.1f}  "
              f"ratio torch/ort {pf['torch'] / pf['onnxruntime']:.2f}x")
        print(f"  decode ms/token           torch {dc['torch']:.2f}  onnxruntime {dc['onnxruntime']:.2f}  "
              f"ratio torch/ort {dc['torch'] / dc['onnxruntime']:.2f}x")
        print(f"  weight-streaming floor {m['decode_floor_ms']:.3f} ms/token; onnxruntime decode is "
              f"{dc['onnxruntime'] / m['decode_floor_ms']:.2f}x the floor")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
