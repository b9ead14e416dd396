"""`scan-export bench model`: whole-model prefill and decode, onnxruntime against transformers eager in
the same run, with the weight-streaming floor; optionally quantized exports next to fp32."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..errors import ScanExportError
from .common import Bench, interleaved_ms, median_ms


def measure_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Weight-streaming bandwidth as onnxruntime achieves it: a (1, K) @ (K, N) MatMul, which must
    read the whole (K, N) matrix once per call, exactly like a decode step reads its weights."""
    import numpy as np
    from onnx import TensorProto, helper

    from ..runtime import make_session

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


def bench_model_types() -> list[str]:
    """The families that declare bench shapes (Family.bench_configs), in registry order, read without
    importing torch (the CLI's parser lists them)."""
    from ..family_names import bench_configs

    return list(bench_configs())


def decode_bytes(model_path) -> int:
    """Initializer bytes one decode token reads: all of them, except tables read only by a Gather
    (one row per token; a table the lm_head also reads counts in full)."""
    import onnx

    from ..onnx.proto_assembly import _ext

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

    from ..runtime.generate import ExportedModel
    from ..runtime.session import _onnxruntime

    ort = _onnxruntime()
    m = ExportedModel(export_dir)
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

    from ..onnx.model_export import export_model
    from ..runtime.generate import ExportedModel

    dirs = {"fp32": root / "q-fp32"}
    export_model(ckpt, dirs["fp32"])
    for q in quantize:
        dirs[q] = export_model(ckpt, root / f"q-{q}", quantize=q)
    models = {k: ExportedModel(d, "cpu") for k, d in dirs.items()}
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

    from .. import tiny
    from ..onnx.model_export import export_model
    from ..runtime.generate import ExportedModel

    from ..reference.models.families import get as family_of

    if model_type not in bench_model_types():
        raise ScanExportError(f"model_type must be one of {sorted(bench_model_types())}, got {model_type!r}")
    family = family_of(model_type)
    results = {"model_type": model_type, "prefill_len": prefill_len, "decode_tokens": decode_tokens, "torch_threads": torch.get_num_threads(),
               "bandwidth_gbs": measure_bandwidth_gbs(), "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        for name in configs:
            if name not in family.bench_configs:
                raise ScanExportError(f"configs must be from {sorted(family.bench_configs)}, got {name!r}")
            params = family.bench_configs[name]
            ckpt = tiny.make_tiny_checkpoint(root / f"{name}-ckpt", model_type, sharpen=False, **params)
            export_dir = export_model(ckpt, root / f"{name}-export")
            ours = ExportedModel(export_dir, "cpu")
            hf = getattr(transformers, family.hf_class).from_pretrained(str(ckpt)).eval()
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


def add_arguments(p, kinds) -> None:
    p.add_argument("--repeats", type=kinds["repeats"], default=3, help="timed runs per contender")
    p.add_argument("--configs", default="tiny,130m",
                   help="comma-separated, from tiny,130m (and for granitemoehybrid moe-8e,moe-32e: 6 of its 130m "
                        "layers with 8 or 32 experts, top 2)")
    p.add_argument("--model-type", default="mamba", choices=bench_model_types(),
                   help="which family")
    p.add_argument("--prefill-len", type=kinds["token_count"], default=512, help="prompt tokens")
    p.add_argument("--decode-tokens", type=kinds["token_count"], default=32, help="decode steps timed")
    p.add_argument("--quantize", default=None,
                   help="comma-separated from int8,int4: also time these exports next to fp32 (prefill, decode, "
                        "file size, weight-streaming floor, ops per decode token)")


def run(args) -> dict:
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    if not configs:
        raise ScanExportError(f"bench: --configs expected names from tiny,130m, got {args.configs!r}")
    quantize = tuple(q.strip() for q in (args.quantize or "").split(",") if q.strip())
    if args.quantize is not None and (not quantize or any(q not in ("int8", "int4") for q in quantize)):
        raise ScanExportError(f"bench: --quantize expected names from int8,int4, got {args.quantize!r}")
    return bench_model(configs=configs, prefill_len=args.prefill_len, decode_tokens=args.decode_tokens,
                       repeats=args.repeats, model_type=args.model_type, quantize=quantize)


BENCH = Bench("model", "whole-model prefill/decode, onnxruntime vs transformers", add_arguments, run, format_model_bench,
              old_flag="--model")
