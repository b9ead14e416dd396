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

from .errors import ScanExportError

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


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median ms of each function, run in turn (a, b, c, a, b, c, ...) after one warm-up each, so
    that a slow spell of the machine hits every contender alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


PLAIN = "onnxruntime CPU, plain torch.onnx.export (Scan)"
WRAPPER = "onnxruntime CPU, scan_export.onnx.export (Scan)"
ROUTE_INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def export_routes(tmp) -> dict:
    """A module calling selective_scan_fn (the bench's options: D, delta_bias, softplus; B, C (b, n, l)),
    exported by the plain torch.onnx.export(dynamo=True) and by our wrapper -> {row name: session}."""
    import torch

    from . import selective_scan_fn
    from .onnx.export import export, save_model
    from .reference.regimes import make_scan_inputs
    from .runtime import make_session

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

    from .onnx.export import save_model
    from .onnx.scan_model import ScanModelSpec, build_scan_model
    from .reference import DEFAULT_CHUNK_SIZE, selective_scan_chunked, selective_scan_ref
    from .reference.mamba_mini import mamba_mini_chunked_scan
    from .reference.regimes import make_scan_inputs
    from .runtime import make_session

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


def write_json(results: dict, path) -> None:
    Path(path).write_text(json.dumps(results, indent=2))


def measure_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Weight-streaming bandwidth as onnxruntime achieves it: a (1, K) @ (K, N) MatMul, which must
    read the whole (K, N) matrix once per call, exactly like a decode step reads its weights."""
    import numpy as np
    from onnx import TensorProto, helper

    from .runtime import make_session

    k = 4096
    n = megabytes * 2**20 // (4 * k)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "bandwidth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    session = make_session(model.SerializeToString(), "cpu")
    feeds = {"x": np.ones((1, k), np.float32), "w": np.ones((k, n), np.float32)}
    ms = median_ms(lambda: session.run(None, feeds), repeats)
    return feeds["w"].nbytes / (ms / 1e3) / 1e9


MODEL_CONFIGS = {("mamba", "tiny"): "TINY", ("mamba", "130m"): "MAMBA_130M",
                 ("mamba2", "tiny"): "TINY", ("mamba2", "130m"): "MAMBA2_130M",
                 ("bamba", "tiny"): "TINY_BAMBA", ("granitemoehybrid", "tiny"): "TINY_GRANITE",
                 ("granitemoehybrid", "130m"): "GRANITE_130M", ("granitemoehybrid", "moe-8e"): "GRANITE_MOE_8E",
                 ("granitemoehybrid", "moe-32e"): "GRANITE_MOE_32E", ("falcon_h1", "tiny"): "TINY_FALCON_H1",
                 ("nemotron_h", "tiny"): "TINY_NEMOTRON_H", ("jamba", "tiny"): "TINY_JAMBA",
                 ("zamba2", "tiny"): "TINY_ZAMBA2"}
HF_CLASS = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "bamba": "BambaForCausalLM",
            "granitemoehybrid": "GraniteMoeHybridForCausalLM", "falcon_h1": "FalconH1ForCausalLM",
            "nemotron_h": "NemotronHForCausalLM", "jamba": "JambaForCausalLM", "zamba2": "Zamba2ForCausalLM"}


def decode_bytes(model_path) -> int:
    """Initializer bytes one decode token reads: all of them, except tables read only by a Gather
    (one row per token; a table the lm_head also reads counts in full)."""
    import onnx

    from .onnx.weights import _ext

    model = onnx.load(str(model_path), load_external_data=False)
    users: dict[str, set] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            users.setdefault(name, set()).add("gather" if n.op_type in ("Gather", "GatherBlockQuantized") and i == 0
                                              else "other")
    total = 0
    for t in model.graph.initializer:
        if users.get(t.name) == {"gather"}:
            continue
        total += (int(_ext(t)["length"]) if t.data_location == onnx.TensorProto.EXTERNAL
                  else len(t.raw_data) or t.ByteSize())
    return total


def ops_per_decode_token(export_dir) -> int:
    """Kernel calls in one decode step (l = 1), subgraph bodies included: onnxruntime's profiler."""
    import numpy as np

    from .runtime.generate import ExportedMamba
    from .runtime.session import _onnxruntime

    ort = _onnxruntime()
    m = ExportedMamba(export_dir)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "p")
        session = ort.InferenceSession(str(Path(export_dir) / m.description["model_file"]), opts,
                                       providers=["CPUExecutionProvider"])
        state = m.zero_state(1)
        feeds = {"input_ids": np.array([[1]], np.int64), "logits_to_keep": np.array(1, np.int64)}
        feeds.update({e["input"]: s for e, s in zip((x[k] for x in m.description["state"] for k in
                                                     ("conv_state", "ssm_state")), state)})
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    return sum(1 for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"))


def bench_quantized(ckpt, root, quantize, prefill_len: int, decode_tokens: int, repeats: int,
                    bandwidth_gbs: float) -> list[dict]:
    """fp32 and each of quantize ("int8", "int4") exports of ckpt side by side: prefill (last
    logits), decode ms/token (median of per-token times, the exports taking turns run by run),
    file size, and each row's weight-streaming floor (decode_bytes / bandwidth)."""
    import numpy as np

    from .onnx.model_export import export_model
    from .runtime.generate import ExportedMamba

    dirs = {"fp32": root / "q-fp32"}
    export_model(ckpt, dirs["fp32"])
    for q in quantize:
        dirs[q] = export_model(ckpt, root / f"q-{q}", quantize=q)
    models = {k: ExportedMamba(d, "cpu") for k, d in dirs.items()}
    ids = np.random.default_rng(0).integers(0, models["fp32"].vocab_size, (1, prefill_len))

    def steps(m, out):
        logits, state = m.forward(ids[:, :8], m.zero_state(1), logits_to_keep=1)
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            logits, state = m.forward(logits[:, -1].argmax(-1)[:, None], state, logits_to_keep=1)
            out.append(time.perf_counter() - t0)

    prefill = interleaved_ms({k: (lambda m=m: m.forward(ids, m.zero_state(1), logits_to_keep=1))
                              for k, m in models.items()}, repeats)
    times = {k: [] for k in models}
    for m in models.values():
        steps(m, [])  # warm-up
    for _ in range(repeats):
        for k, m in models.items():
            steps(m, times[k])
    rows = []
    for k, d in dirs.items():
        path = d / models[k].description["model_file"]
        read = decode_bytes(path)
        floor = read / (bandwidth_gbs * 1e9) * 1e3
        decode = 1e3 * float(np.median(times[k]))
        rows.append({"weights": k, "file_mb": sum(f.stat().st_size for f in d.glob("model.onnx*")) / 1e6,
                     "decode_read_mb": read / 1e6, "prefill_ms": prefill[k], "decode_ms_per_token": decode,
                     "decode_floor_ms": floor, "decode_vs_floor": decode / floor,
                     "ops_per_decode_token": ops_per_decode_token(d)})
    return rows


def bench_model(configs=("tiny", "130m"), prefill_len: int = 512, decode_tokens: int = 32, repeats: int = 3,
                workdir=None, model_type: str = "mamba", quantize=()) -> dict:
    """Prefill tokens/s and decode ms/token (median of per-token times): onnxruntime CPU vs
    transformers eager, same run."""
    import numpy as np
    import torch
    import transformers

    from . import tiny
    from .onnx.model_export import export_model
    from .runtime.generate import ExportedMamba

    if model_type not in HF_CLASS:
        raise ScanExportError(f"model_type must be one of {sorted(HF_CLASS)}, got {model_type!r}")
    results = {"model_type": model_type, "prefill_len": prefill_len, "decode_tokens": decode_tokens, "torch_threads": torch.get_num_threads(),
               "bandwidth_gbs": measure_bandwidth_gbs(), "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        for name in configs:
            if (model_type, name) not in MODEL_CONFIGS:
                raise ScanExportError(f"configs must be from {sorted({c for _, c in MODEL_CONFIGS})}, got {name!r}")
            params = getattr(tiny, MODEL_CONFIGS[model_type, name])
            ckpt = tiny.make_tiny_checkpoint(root / f"{name}-ckpt", model_type, sharpen=False, **params)
            export_dir = export_model(ckpt, root / f"{name}-export")
            ours = ExportedMamba(export_dir, "cpu")
            hf = getattr(transformers, HF_CLASS[model_type]).from_pretrained(str(ckpt)).eval()
            vocab = ours.vocab_size
            ids = np.random.default_rng(0).integers(0, vocab, (1, prefill_len))
            prompt = torch.from_numpy(ids[:, :8])

            def hf_step_times():
                """Per-token decode times from transformers' own generate loop: a streamer stamps
                each token as it arrives (the first put is the prompt, the second ends prefill)."""
                stamps = []

                class Stamp(transformers.generation.streamers.BaseStreamer):
                    def put(self, value):
                        stamps.append(time.perf_counter())

                    def end(self):
                        pass

                hf.generate(prompt, max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1,
                            do_sample=False, streamer=Stamp())
                return np.diff(stamps[1:])

            def ort_step_times():
                logits, state = ours.forward(ids[:, :8], ours.zero_state(1))
                times = []
                for _ in range(decode_tokens):
                    t0 = time.perf_counter()
                    logits, state = ours.forward(logits[:, -1].argmax(-1)[:, None], state)
                    times.append(time.perf_counter() - t0)
                return times

            # Prefill two ways, the same work on both sides: for generation (the last position's
            # logits only, as transformers' generate() asks with logits_to_keep=1) and with every
            # position's logits. The two libraries alternate run by run, so drift in this noisy
            # machine's speed lands on both.
            def run_hf_prefill(keep):
                with torch.inference_mode():
                    hf(torch.from_numpy(ids), logits_to_keep=keep)

            prefill = interleaved_ms({
                "transformers last": lambda: run_hf_prefill(1),
                "onnxruntime last": lambda: ours.forward(ids, ours.zero_state(1), logits_to_keep=1),
                "transformers all": lambda: run_hf_prefill(0),
                "onnxruntime all": lambda: ours.forward(ids, ours.zero_state(1)),
            }, repeats)
            hf_prefill, ort_prefill = prefill["transformers last"], prefill["onnxruntime last"]
            hf_prefill_all, ort_prefill_all = prefill["transformers all"], prefill["onnxruntime all"]
            with torch.inference_mode():
                hf_step_times()  # warm-up
            ort_step_times()  # warm-up
            hf_steps, ort_steps = [], []
            for _ in range(repeats):
                with torch.inference_mode():
                    hf_steps.extend(hf_step_times())
                ort_steps.extend(ort_step_times())
            hf_decode, ort_decode_ms = (1e3 * float(np.median(t)) for t in (hf_steps, ort_steps))
            weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied lm_head counted once
            # A decode step reads the routed experts only: k of E of every expert matrix.
            experts = getattr(hf.config, "num_local_experts", 0) or 0
            expert_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if ".experts." in n)
            active_bytes = weight_bytes - expert_bytes * (1 - hf.config.num_experts_per_tok / experts) if experts else weight_bytes
            floor_ms = active_bytes / (results["bandwidth_gbs"] * 1e9) * 1e3
            results["models"].append({
                "config": name, "params_m": round(weight_bytes / 4e6, 1), "active_params_m": round(active_bytes / 4e6, 1),
                "experts": experts or None, "experts_per_token": getattr(hf.config, "num_experts_per_tok", None) if experts else None,
                "prefill_ms": {"transformers": hf_prefill, "onnxruntime": ort_prefill},
                "prefill_tokens_per_s": {"transformers": prefill_len / hf_prefill * 1e3,
                                         "onnxruntime": prefill_len / ort_prefill * 1e3},
                "prefill_all_logits_ms": {"transformers": hf_prefill_all, "onnxruntime": ort_prefill_all},
                "decode_ms_per_token": {"transformers": hf_decode, "onnxruntime": ort_decode_ms},
                "prefill_speedup": hf_prefill / ort_prefill,
                "prefill_all_logits_speedup": hf_prefill_all / ort_prefill_all,
                "decode_speedup": hf_decode / ort_decode_ms,
                "decode_floor_ms": floor_ms,
                "decode_vs_floor": ort_decode_ms / floor_ms,
            })
            if quantize:
                del ours, hf
                results["models"][-1]["quantized"] = bench_quantized(
                    ckpt, root / name, quantize, prefill_len, decode_tokens, repeats, results["bandwidth_gbs"])
    return results


def format_model_bench(results: dict) -> str:
    lines = [f"whole model ({results['model_type']}), CPU, torch threads={results['torch_threads']}, measured bandwidth "
             f"{results['bandwidth_gbs']:.1f} GB/s, prefill {results['prefill_len']} tokens, "
             f"decode {results['decode_tokens']} tokens"]
    for m in results["models"]:
        lines += [
            f"\n{m['config']} ({m['params_m']} M params"
            + (f", {m['experts']} experts top-{m['experts_per_token']}, {m['active_params_m']} M active per token"
               if m.get("experts") else "") + ")",
            f"  {'':<28} {'transformers':>14} {'onnxruntime':>14} {'ratio':>8}",
            f"  {'prefill ms (last logits)':<28} {m['prefill_ms']['transformers']:>14.1f} "
            f"{m['prefill_ms']['onnxruntime']:>14.1f} {m['prefill_speedup']:>7.2f}x",
            f"  {'prefill tokens/s':<28} {m['prefill_tokens_per_s']['transformers']:>14.0f} "
            f"{m['prefill_tokens_per_s']['onnxruntime']:>14.0f}",
            f"  {'prefill ms (all logits)':<28} {m['prefill_all_logits_ms']['transformers']:>14.1f} "
            f"{m['prefill_all_logits_ms']['onnxruntime']:>14.1f} {m['prefill_all_logits_speedup']:>7.2f}x",
            f"  {'decode ms/token':<28} {m['decode_ms_per_token']['transformers']:>14.2f} "
            f"{m['decode_ms_per_token']['onnxruntime']:>14.2f} {m['decode_speedup']:>7.2f}x",
            f"  weight-streaming floor {m['decode_floor_ms']:.2f} ms/token; onnxruntime decode is "
            f"{m['decode_vs_floor']:.2f}x the floor",
        ]
        if m.get("quantized"):
            lines.append(f"  {'onnxruntime weights':<20} {'file MB':>9} {'read/token MB':>14} {'prefill ms':>11} "
                         f"{'decode ms':>10} {'floor ms':>9} {'decode/floor':>13} {'ops/token':>10}")
            for r in m["quantized"]:
                lines.append(f"  {r['weights']:<20} {r['file_mb']:>9.1f} {r['decode_read_mb']:>14.1f} "
                             f"{r['prefill_ms']:>11.1f} {r['decode_ms_per_token']:>10.2f} {r['decode_floor_ms']:>9.2f} "
                             f"{r['decode_vs_floor']:>12.2f}x {r['ops_per_decode_token']:>10}")
    return "\n".join(lines)


SSD_SHAPE = (1, 24, 64, 128, 2048)  # (batch, heads, headdim, dstate, seqlen)


def bench_ssd(shape=SSD_SHAPE, regime: str = "init", repeats: int = 5, groups: int = 1) -> dict:
    """Mamba-2 SSD scan: eager sequential, eager chunked, onnxruntime CPU (portable lowering)."""
    import torch

    from .onnx.export import save_model
    from .onnx.ssd_model import SSDModelSpec, build_ssd_model
    from .reference.regimes import make_ssd_inputs
    from .reference.ssd import ssd_scan_chunked, ssd_scan_ref
    from .runtime import make_session

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


# ------------------------------------------------------------------------------------------------
# Export memory: peak RSS and time of export_model, each in a fresh child process

# (name, checkpoint maker, config): "130m" through transformers (tiny.MAMBA_130M); "3g": untied
# embeddings and lm_head at hidden 4096 (a 7B's width), four layers: 3.33 GB of fp32 weights.
SYNTHETIC_3G = dict(vocab_size=50280, hidden_size=4096, num_hidden_layers=4, tie_word_embeddings=False)


def make_synthetic_checkpoint(path, seed: int = 0, **config) -> Path:
    """A random `mamba` checkpoint (config.json + model.safetensors) of any size, written one tensor
    at a time, without transformers: for memory and speed tests of the export, not for its numerics
    (values are N(0, 0.02²), A_log = log(1..n), D = 1)."""
    import math

    import torch

    from .reference.models import MambaLM, MambaLMConfig

    hf = {"model_type": "mamba", "vocab_size": 256, "hidden_size": 64, "state_size": 16, "num_hidden_layers": 2,
          "conv_kernel": 4, "expand": 2, "tie_word_embeddings": True, "use_bias": False, "use_conv_bias": True,
          "time_step_rank": "auto", "layer_norm_epsilon": 1e-5, **config}
    hf["time_step_rank"] = hf["time_step_rank"] if hf["time_step_rank"] != "auto" else math.ceil(hf["hidden_size"] / 16)
    hf["intermediate_size"] = hf["expand"] * hf["hidden_size"]
    cfg = MambaLMConfig.from_hf(hf)
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in MambaLM(cfg).named_parameters()}
    if hf["tie_word_embeddings"]:
        shapes.pop("lm_head.weight")
    header, offset = {}, 0
    for k, s in shapes.items():
        n = math.prod(s) * 4
        header[k] = {"dtype": "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    gen = torch.Generator().manual_seed(seed)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k, s in shapes.items():
            if k.endswith("A_log"):
                t = torch.log(torch.arange(1, s[1] + 1, dtype=torch.float32)).expand(s)
            elif k.endswith((".D", "norm.weight", "norm_f.weight")):
                t = torch.ones(s)
            else:
                t = torch.randn(s, generator=gen) * 0.02
            f.write(t.contiguous().numpy().tobytes())
    return path


def _vm(field: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS: now; VmHWM: the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")  # not Linux


def export_memory_child(checkpoint_dir, out_dir) -> dict:
    """Run in a fresh process: export_model with RSS sampled every 5 ms, attributed to the stage the
    progress callback last announced. Returns the peak (VmHWM) and per-stage peaks and times."""
    import threading

    stages, current, lock = {}, ["imports"], threading.Lock()
    t0 = time.perf_counter()
    stages["imports"] = {"peak_rss": _vm("VmRSS"), "start": t0}
    done = threading.Event()

    def sample():
        while not done.wait(0.005):
            with lock:
                s = stages[current[0]]
                s["peak_rss"] = max(s["peak_rss"], _vm("VmRSS"))

    def progress(stage, _done, _total):
        with lock:
            if stage != current[0]:
                now = time.perf_counter()
                stages[current[0]]["seconds"] = now - stages[current[0]]["start"]
                stages.setdefault(stage, {"peak_rss": 0, "start": now})
                current[0] = stage

    threading.Thread(target=sample, daemon=True).start()
    from .onnx.model_export import export_model

    out = export_model(checkpoint_dir, out_dir, force=True, progress=progress)
    progress("done", 0, 0)
    done.set()
    total = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in Path(out).iterdir()}
    return {"peak_rss": _vm("VmHWM"), "seconds": total, "files": files,
            "stages": {k: {"peak_rss": v["peak_rss"], "seconds": v.get("seconds", 0.0)}
                       for k, v in stages.items() if k != "done"}}


def bench_export_memory(configs=("130m", "3g"), workdir=None) -> dict:
    """Peak RSS and time of `export_model` per checkpoint, each export in its own process (so one
    export's peak cannot hide another's), against the issue's bound 1.5 x weights + 1.5 GB."""
    import subprocess
    import sys

    from . import tiny

    results = {"models": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        for name in configs:
            ckpt = root / f"{name}-ckpt"
            if name == "130m":
                tiny.make_tiny_checkpoint(ckpt, "mamba", sharpen=False, **tiny.MAMBA_130M)
            elif name == "3g":
                make_synthetic_checkpoint(ckpt, **SYNTHETIC_3G)
            else:
                raise ScanExportError(f"bench --export-memory: configs must be from 130m,3g, got {name!r}")
            code = ("import json, sys; from scan_export.bench import export_memory_child; "
                    "print(json.dumps(export_memory_child(sys.argv[1], sys.argv[2])))")
            proc = subprocess.run([sys.executable, "-c", code, str(ckpt), str(root / f"{name}-export")],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"export of {name} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            weights = sum(r["files"].get(f, 0) for f in ("model.onnx", "model.onnx.data"))  # weights + a graph of a few MB
            r.update(config=name, weight_bytes=weights, bound=1.5 * weights + 1.5e9,
                     checkpoint_bytes=sum(p.stat().st_size for p in ckpt.glob("*.safetensors")))
            results["models"].append(r)
    return results


def format_export_memory_bench(results: dict) -> str:
    gb = 1e9
    lines = []
    for m in results["models"]:
        lines += [f"\n{m['config']}: exported weights {m['weight_bytes'] / gb:.2f} GB (checkpoint "
                  f"{m['checkpoint_bytes'] / gb:.2f} GB), peak RSS {m['peak_rss'] / gb:.2f} GB = "
                  f"{m['peak_rss'] / m['weight_bytes']:.2f} x weights (bound 1.5 x + 1.5 GB = {m['bound'] / gb:.2f} GB), "
                  f"{m['seconds']:.0f} s",
                  f"  {'stage':<22} {'peak RSS GB':>12} {'seconds':>9}"]
        for stage, s in m["stages"].items():
            lines.append(f"  {stage:<22} {s['peak_rss'] / gb:>12.2f} {s['seconds']:>9.1f}")
    return "\n".join(lines).lstrip("\n")
