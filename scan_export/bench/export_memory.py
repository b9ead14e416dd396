"""`scan-export bench export-memory`: peak RSS and time of export_model, each export in a fresh child
process, per stage."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..errors import ScanExportError
from .common import Bench


# (name, checkpoint maker, config): "130m" through transformers (tiny.MAMBA_130M); "3g": untied
# embeddings and lm_head at hidden 4096 (a 7B's width), four layers: 3.33 GB of fp32 weights.
SYNTHETIC_3G = dict(vocab_size=50280, hidden_size=4096, num_hidden_layers=4, tie_word_embeddings=False)


def make_synthetic_checkpoint(path, seed: int = 0, **config) -> Path:
    """A random `mamba` checkpoint (config.json + model.safetensors) of any size, written one tensor
    at a time, without transformers: for memory and speed tests of the export, not for its numerics
    (values are N(0, 0.02²), A_log = log(1..n), D = 1)."""
    import math

    import torch

    from ..reference.models import MambaLM, MambaLMConfig

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
    from ..onnx.model_export import export_model

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

    from .. import tiny

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
            code = ("import json, sys; from scan_export.bench.export_memory import export_memory_child; "
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


def add_arguments(p, kinds) -> None:
    pass  # the two checkpoints are fixed: the bound is checked at a 130m and a 3.3 GB size


def run(args) -> dict:
    return bench_export_memory()


BENCH = Bench("export-memory", "peak RSS and time of export-model on a 130m-shaped and a 3.3 GB checkpoint "
              "(random weights)", add_arguments, run, format_export_memory_bench, old_flag="--export-memory")
