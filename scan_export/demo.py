"""`scan-export demo`: the main job on a built-in default, offline.

Builds a tiny random Mamba, saves it as a real HF checkpoint, exports it, generates in onnxruntime,
verifies against transformers, and prints a short report.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .errors import read_json_object


DEMO_ENTRIES = {"checkpoint", "export"}
# In workdir/checkpoint: {file: sha256} of what the demo wrote there, so that a later demo rewrites
# only files it can prove are its own.
CHECKPOINT_RECORD = ".scan-export-demo.json"


def _record_checkpoint(ckpt: Path) -> None:
    from .onnx.output_dir import hash_files

    names = [p.name for p in ckpt.iterdir() if p.is_file() and p.name != CHECKPOINT_RECORD]
    (ckpt / CHECKPOINT_RECORD).write_text(json.dumps({"written_by": "scan-export demo", "sha256": hash_files(ckpt, names)}))


def _unproven_checkpoint_files(ckpt: Path) -> list[str]:
    """The entries of an earlier demo's checkpoint folder that the demo cannot prove it wrote."""
    from .onnx.output_dir import is_ours

    try:
        hashes = json.loads((ckpt / CHECKPOINT_RECORD).read_text()).get("sha256")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        hashes = None
    entries = sorted(p.name for p in ckpt.iterdir() if p.name != CHECKPOINT_RECORD)
    if not isinstance(hashes, dict):
        return entries
    return [n for n in entries if not is_ours(ckpt / n, hashes.get(n))]


def check_workdir(workdir) -> None:
    """The demo writes workdir/checkpoint and workdir/export: refuse a workdir holding anything
    else, or an earlier demo's folder whose files no longer match what that demo wrote (hashes),
    so that no file of the user's is ever overwritten."""
    from .errors import ScanExportError
    from .onnx.output_dir import previous_export_files

    root = Path(workdir)
    if root.exists() and not root.is_dir():
        raise ScanExportError(f"--workdir {str(workdir)!r} is a file, expected a new, empty, or earlier demo's directory")
    if not root.is_dir():
        return
    entries = {p.name for p in root.iterdir()}
    earlier = entries <= DEMO_ENTRIES and (not (root / "export").exists() or previous_export_files(root / "export") is not None)
    if entries and not earlier:
        raise ScanExportError(f"--workdir {str(workdir)!r} holds files the demo did not write "
                              f"({', '.join(sorted(entries)[:3])}); expected a new, empty, or earlier demo's directory")
    ckpt = root / "checkpoint"
    if ckpt.is_symlink() or (ckpt.exists() and not ckpt.is_dir()):
        raise ScanExportError(f"--workdir {str(workdir)!r}: checkpoint is not a folder the demo wrote; "
                              f"expected a new, empty, or earlier demo's directory")
    if ckpt.is_dir() and (bad := _unproven_checkpoint_files(ckpt)):
        raise ScanExportError(f"--workdir {str(workdir)!r}: checkpoint/{bad[0]} is not what an earlier demo wrote "
                              f"(its hash does not match, or the record is missing); the demo would overwrite it, "
                              f"expected a new, empty, or unchanged earlier demo's directory")


def run_demo(workdir=None, model_type: str = "mamba", n_tokens: int = 20, out=None) -> bool:
    from .onnx.model_export import export_model
    from .runtime.generate import ExportedModel, generate
    from .tiny import make_tiny_checkpoint
    from .verify import verify_export

    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a redirected stdout
    if workdir is not None:
        check_workdir(workdir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
        t0 = time.perf_counter()
        ckpt = make_tiny_checkpoint(root / "checkpoint", model_type)
        _record_checkpoint(ckpt)
        cfg = read_json_object(ckpt / "config.json")
        layers = cfg.get("num_hidden_layers") or len(cfg.get("layers_block_type") or [])  # nemotron_h: the pattern's
        say(f"1. checkpoint   {ckpt}  ({model_type}, {layers} layers, "
            f"hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}, random seed 0)")
        t1 = time.perf_counter()
        export_dir = export_model(ckpt, root / "export")
        model = ExportedModel(export_dir, "cpu")
        d = model.description
        say(f"2. export       {export_dir}/model.onnx  ({d['node_count']} nodes, IR {d['ir_version']}, "
            f"opset {d['opset']}, {time.perf_counter() - t1:.1f} s)")
        prompt = [1, 2, 3, 4, 5]
        print(f"3. generate     onnxruntime CPU, prompt {prompt}, greedy:", end="", file=out, flush=True)
        t2 = time.perf_counter()
        generate(model, [prompt], n_tokens, on_token=lambda _row, tok: print(f" {tok}", end="", file=out, flush=True))
        say(f"  ({1e3 * (time.perf_counter() - t2) / n_tokens:.1f} ms/token)")
        report = verify_export(export_dir, ckpt)
        say("4. verify against transformers float64, bar from transformers float32 (logits at prompt lengths "
            "1, 7, 64, 100; states; 3 × 32 greedy tokens)")
        say("   " + report.format().replace("\n", "\n   "))
        say(f"done in {time.perf_counter() - t0:.1f} s: {'PASS' if report.passed else 'FAIL'}")
        if workdir is None:  # the paths printed above are about to go: say so, and how to keep them
            say("(the checkpoint and export lived in a temporary folder, now removed; --workdir DIR keeps them)")
        return report.passed
