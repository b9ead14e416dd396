"""scan_export (onnxruntime CPU) and llama.cpp side by side, on the same random checkpoints.

Not run in CI: it needs a llama.cpp build (llama-bench, llama-quantize) and its source tree (for
convert_hf_to_gguf.py and its bundled gguf-py). docs/benchmarks.md says how to get both and shows
the last run's table.

    python benchmarks/llama_cpp_side_by_side.py --llama-build /work/llama-build \
        --llama-src /work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp

Per model type (mamba, mamba2, granitemoehybrid, each at its 130m shape from its family's
bench_configs): one random checkpoint (scan_export.tiny), converted by llama.cpp's own converter to an
f32 GGUF and quantized by llama-quantize to q8_0, q4_0 and q4_0 --pure; exported by us with
quantize none / int8 / int4. Then both engines are timed in the same process run, taking turns rep by
rep (llama.cpp, ours, next bit width, ...), so that a slow spell of this shared machine lands on both:

- llama.cpp: `llama-bench -m X.gguf -p 512 -n 64 -t 2 -r 1 -o json` per rep (its own warm-up run,
  model load not timed): pp512 = one 512-token prefill, tg64 = 64 decode steps from an empty context.
- ours: the measurement of `scan-export bench --model`: prefill = one forward of 512 random tokens
  with logits_to_keep=1 (what llama.cpp also computes: the last position's logits), decode = per-token
  times after an 8-token prompt, median (scan_export.bench.common.median_ms).

Printed: per model type and bit width, prefill ms and decode ms/token of both, and the ratios
ours / llama.cpp (time ratios: above 1 = ours slower), medians over the reps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scan_export import tiny
from scan_export.bench.common import median_ms
from scan_export.reference.models.families import get as family_of

MODEL_TYPES = ("mamba", "mamba2", "granitemoehybrid")
# (row, llama-quantize arguments or None for the f32 GGUF itself, our export's quantize=): q4_0 plain
# keeps llama.cpp's default mix (its output/embedding tensor at a higher type), --pure makes every
# quantizable tensor q4_0; our int4 quantizes every weight MatMul and the (tied) table, block 32, so
# the two q4_0 rows bracket it.
WIDTHS = (("f32", None, "none"), ("q8_0", ["q8_0"], "int8"), ("q4_0", ["q4_0"], "int4"),
          ("q4_0 --pure", ["--pure", "q4_0"], "int4"))


def run(cmd, what: str, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


# transformers 5.x's save_pretrained spells GraniteMoeHybrid's layer_types "linear_attention" /
# "full_attention"; llama.cpp's converter (GraniteHybridModel.get_attn_layers) looks for the Hub's
# granite-4.0 spelling "attention" ("mamba" otherwise), so it takes every layer for Mamba, writes
# head_count_kv [0, ..., 0], and llama.cpp then fails to load the GGUF (blk.N.ssm_in.weight not found).
LAYER_TYPE_SPELLING = {"full_attention": "attention", "linear_attention": "mamba"}


def converter_input(ckpt: Path, dst: Path) -> tuple[Path, list[str]]:
    """A view of ckpt for llama.cpp's converter: the same weight files (symlinks), and config.json
    with the two fields the converter reads differently from transformers 5.25, changed. Returns the
    view and a note per change (both are printed: they are what "the converter accepts our
    checkpoints" needed)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((ckpt / "config.json").read_text())
    notes = []
    if any(t in LAYER_TYPE_SPELLING for t in config.get("layer_types") or ()):
        config["layer_types"] = [LAYER_TYPE_SPELLING.get(t, t) for t in config["layer_types"]]
        notes.append("layer_types respelled attention/mamba")
    # The Mamba-2 converter pads the vocabulary to pad_vocab_size_multiple (default 16: state-spaces'
    # mamba2 checkpoints store 50288 embedding rows), and llama.cpp then expects that many rows; ours
    # has vocab_size rows (50280, a multiple of 8), so say 8, as the Mamba-1 converter's default is.
    if config.get("model_type") == "mamba2" and config["vocab_size"] % 16 and "pad_vocab_size_multiple" not in config:
        config["pad_vocab_size_multiple"] = 8
        notes.append("pad_vocab_size_multiple 8")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, notes


def convert(ckpt: Path, llama_src: Path, out: Path) -> str:
    """llama.cpp's convert_hf_to_gguf.py on our checkpoint, f32. Returns the converter's note on the
    tokenizer: our checkpoints have none (scan_export.tiny writes config.json, generation_config.json
    and model.safetensors only), and the Mamba / Mamba-2 / GraniteHybrid converters then fall back to
    llama.cpp's bundled GPT-NeoX vocabulary (models/ggml-vocab-gpt-neox.gguf), cut to vocab_size."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py shipped next to the converter, not a pip one
    proc = run([sys.executable, llama_src / "convert_hf_to_gguf.py", ckpt, "--outtype", "f32", "--outfile", out],
               "convert_hf_to_gguf.py", env=env)
    lines = (proc.stdout + proc.stderr).splitlines()
    builtin = [line for line in lines if "Using tokenizer from" in line]
    return (builtin[0].split(":", 2)[-1].strip() + " (no tokenizer files in the checkpoint)" if builtin
            else "tokenizer from the checkpoint")


def llama_bench(build: Path, gguf: Path, prefill: int, decode: int, threads: int) -> dict:
    """One llama-bench run (-r 1: one timed repetition after its warm-up) -> {prefill_ms, decode_ms}."""
    proc = run([build / "bin" / "llama-bench", "-m", gguf, "-p", prefill, "-n", decode, "-t", threads,
                "-r", 1, "-o", "json"], "llama-bench")
    rows = json.loads(proc.stdout)
    pp = next(r for r in rows if r["n_prompt"] == prefill and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == decode and r["n_prompt"] == 0)
    # avg_ts is tokens/s of the run: pp512 -> the whole prefill's ms; tg64 -> mean ms per token.
    return {"prefill_ms": prefill / pp["avg_ts"] * 1e3, "decode_ms": 1e3 / tg["avg_ts"],
            "cpu_info": pp.get("cpu_info"), "model_type": pp.get("model_type"), "build": pp.get("build_commit")}


def ours_bench(model, ids: np.ndarray, decode: int) -> dict:
    """One rep of `scan-export bench --model`'s measurement on one export: prefill with the last
    position's logits (bench.median_ms, one timed call; the warm-up ran once at load), then per-token
    decode times after an 8-token prompt, as scan_export/bench/model.py times them."""
    prefill_ms = median_ms(lambda: model.forward(ids, model.zero_state(1), logits_to_keep=1), 1, warmup=0)
    logits, state = model.forward(ids[:, :8], model.zero_state(1), logits_to_keep=1)
    steps = []
    for _ in range(decode):
        t0 = time.perf_counter()
        logits, state = model.forward(logits[:, -1].argmax(-1)[:, None], state, logits_to_keep=1)
        steps.append(time.perf_counter() - t0)
    return {"prefill_ms": prefill_ms, "decode_ms": 1e3 * float(np.median(steps))}


def bench_type(model_type: str, root: Path, args) -> dict:
    from scan_export.onnx.model_export import export_model
    from scan_export.runtime.generate import ExportedModel

    params = family_of(model_type).bench_configs[args.config]
    t0 = time.perf_counter()
    ckpt = tiny.make_tiny_checkpoint(root / f"{model_type}-ckpt", model_type, sharpen=False, **params)
    f32 = root / f"{model_type}-f32.gguf"
    view, changes = converter_input(ckpt, root / f"{model_type}-ckpt-for-llama")
    note = convert(view, args.llama_src, f32) + ("; config.json for the converter: " + ", ".join(changes) if changes else "")
    ggufs = {}
    for name, qargs, _ in WIDTHS:
        if qargs is None:
            ggufs[name] = f32
        else:
            ggufs[name] = root / f"{model_type}-{name.replace(' --', '-')}.gguf"
            run([args.llama_build / "bin" / "llama-quantize", *qargs[:-1], f32, ggufs[name], qargs[-1], args.threads],
                "llama-quantize")
    exports = {q: export_model(ckpt, root / f"{model_type}-onnx-{q}", quantize=q)
               for q in dict.fromkeys(q for *_, q in WIDTHS)}
    prep_s = time.perf_counter() - t0
    print(f"{model_type}: checkpoint, GGUFs and exports ready in {prep_s:.0f} s; converter: {note}", flush=True)

    models = {q: ExportedModel(d, "cpu", threads=args.threads) for q, d in exports.items()}
    ids = np.random.default_rng(0).integers(0, models["none"].vocab_size, (1, args.prefill))
    for m in models.values():  # one warm-up each (llama-bench warms up inside every call)
        ours_bench(m, ids, 2)
    times = {name: {"llama": [], "ours": []} for name, *_ in WIDTHS}
    info = {}
    for rep in range(args.reps):
        ours_this_rep = {}
        for name, _, q in WIDTHS:
            r = llama_bench(args.llama_build, ggufs[name], args.prefill, args.decode, args.threads)
            info = {k: r.pop(k) for k in ("cpu_info", "model_type", "build")}
            times[name]["llama"].append(r)
            # The two q4_0 rows share our int4 export: timed once per rep, right after the first.
            if q not in ours_this_rep:
                ours_this_rep[q] = ours_bench(models[q], ids, args.decode)
            times[name]["ours"].append(ours_this_rep[q])
        print(f"  rep {rep + 1}/{args.reps} done", flush=True)
    del models
    rows = []
    for name, _, q in WIDTHS:
        med = {eng: {k: statistics.median(r[k] for r in times[name][eng]) for k in ("prefill_ms", "decode_ms")}
               for eng in ("llama", "ours")}
        rows.append({"bits": name, "ours_quantize": q, "llama": med["llama"], "ours": med["ours"],
                     "prefill_ratio": med["ours"]["prefill_ms"] / med["llama"]["prefill_ms"],
                     "decode_ratio": med["ours"]["decode_ms"] / med["llama"]["decode_ms"],
                     "gguf_mb": ggufs[name].stat().st_size / 1e6,
                     "onnx_mb": sum(f.stat().st_size for f in exports[q].glob("model.onnx*")) / 1e6,
                     "reps": times[name]})
    return {"model_type": model_type, "llama_model_type": (info.get("model_type") or "?").split()[0], "converter_tokenizer": note,
            "llama_build": info.get("build"), "cpu_info": info.get("cpu_info"), "rows": rows}


def format_table(results: dict) -> str:
    lines = [f"{results['config']} shapes, prefill {results['prefill']} tokens, decode {results['decode']} tokens, {results['threads']} threads, "
             f"{results['reps']} alternating reps, medians; ratio = ours / llama.cpp time (> 1: ours slower)",
             "",
             "| model type | bits (llama.cpp / ours) | GGUF MB | ONNX MB | llama.cpp prefill ms | ours prefill ms | "
             "prefill ratio | llama.cpp decode ms/tok | ours decode ms/tok | decode ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in results["types"]:
        for r in t["rows"]:
            lines.append(f"| {t['model_type']} | {r['bits']} / {r['ours_quantize']} | {r['gguf_mb']:.0f} | "
                         f"{r['onnx_mb']:.0f} | {r['llama']['prefill_ms']:.0f} | {r['ours']['prefill_ms']:.0f} | "
                         f"{r['prefill_ratio']:.2f} | {r['llama']['decode_ms']:.2f} | {r['ours']['decode_ms']:.2f} | "
                         f"{r['decode_ratio']:.2f} |")
    for t in results["types"]:
        lines.append(f"\n{t['model_type']}: llama.cpp loads it as `{t['llama_model_type']}`; converter: "
                     f"{t['converter_tokenizer']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-build", type=Path, required=True, help="cmake build dir with bin/llama-bench, bin/llama-quantize")
    p.add_argument("--llama-src", type=Path, required=True, help="llama.cpp source dir (convert_hf_to_gguf.py, gguf-py)")
    p.add_argument("--model-types", default=",".join(MODEL_TYPES), help=f"comma-separated from {','.join(MODEL_TYPES)}")
    p.add_argument("--config", default="130m", choices=["130m", "tiny"],
                   help="the shape, from the family's bench_configs (reference/models/families/) (tiny: to try the script quickly)")
    p.add_argument("--reps", type=int, default=3, help="alternating reps per engine and bit width")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None, help="keep checkpoints, GGUFs and exports here")
    p.add_argument("--json", type=Path, default=None, help="also write every rep's numbers here")
    args = p.parse_args(argv)
    for tool in ("llama-bench", "llama-quantize"):
        if not (args.llama_build / "bin" / tool).is_file():
            p.error(f"--llama-build: no bin/{tool} in {args.llama_build}")
    if not (args.llama_src / "convert_hf_to_gguf.py").is_file():
        p.error(f"--llama-src: no convert_hf_to_gguf.py in {args.llama_src}")
    types = [t.strip() for t in args.model_types.split(",") if t.strip()]
    if bad := [t for t in types if t not in MODEL_TYPES]:
        p.error(f"--model-types: unknown {bad}")
    results = {"config": args.config, "prefill": args.prefill, "decode": args.decode, "threads": args.threads, "reps": args.reps,
               "machine": platform.processor() or platform.machine(), "load_before": os.getloadavg(),
               "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "types": []}
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            root = args.workdir / t if args.workdir else Path(tmp) / t
            root.mkdir(parents=True, exist_ok=True)
            results["types"].append(bench_type(t, root, args))
            if not args.workdir:  # a 130m type leaves several GB of files; free them before the next
                shutil.rmtree(root)
            print(format_table(results), flush=True)  # so far: a long run cut short keeps what it measured
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    results["load_after"] = os.getloadavg()
    print()
    print(format_table(results))
    print(f"\nload average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f} "
          f"(1 min; this machine has {os.cpu_count()} cores)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
