"""Held-out bits per byte and greedy agreement of the byte-level fixtures' exports: fp32, fp16, and
int8 / int4 made by hand with onnxruntime's MatMulNBitsQuantizer on the fp32 export (every weight
MatMul; accuracy_level 4, block 32 unless told otherwise), until `export-model --quantize` exists.

    PYTHONPATH=$PWD python3 tools/measure_fixture_quality.py --work /tmp/fixture-quality

Prints one markdown row per (model, dtype): bpb over the held-out split (tests/fixtures/bytes-heldout.txt),
its ratio to fp32, and the greedy agreement with fp32 over 256 tokens from 4 held-out prompts.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
# 4 prompts of 32 held-out bytes, spread over the split.
PROMPT_OFFSETS = (0, 8192, 16384, 24576)
PROMPT_BYTES = 32


def quantize_by_hand(fp32_dir: Path, out_dir: Path, bits: int, block_size: int, accuracy_level: int,
                     symmetric: bool) -> Path:
    """A copy of the fp32 export whose weight MatMuls are MatMulNBits (onnxruntime's own quantizer)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(fp32_dir, out_dir)
    model = onnx.load(str(fp32_dir / "model.onnx"))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level, bits=bits)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, algo_config=config)
    q.process()
    onnx.save(q.model.model, str(out_dir / "model.onnx"))
    return out_dir


def op_count(path: Path, op: str) -> int:
    import onnx

    def count(graph):
        n = 0
        for node in graph.node:
            n += node.op_type == op
            for attr in node.attribute:
                if attr.g.node:
                    n += count(attr.g)
                n += sum(count(g) for g in attr.graphs)
        return n

    return count(onnx.load(str(path)).graph)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch directory for the exports (replaced)")
    ap.add_argument("--fixtures", type=Path, default=FIXTURES)
    ap.add_argument("--model-types", default="mamba,mamba2")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--symmetric", action="store_true", help="symmetric quantization (default: with zero points)")
    ap.add_argument("--heldout-bytes", type=int, default=0, help="use the first N held-out bytes (0: all)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from scan_export.onnx.model_export import export_model
    from scan_export.runtime import ExportedModel
    from scan_export.runtime.quality import bits_per_byte, greedy_agreement

    held = (args.fixtures / "bytes-heldout.txt").read_bytes()
    held = held[:args.heldout_bytes] if args.heldout_bytes else held
    prompts = [held[o:o + PROMPT_BYTES] for o in PROMPT_OFFSETS if o + PROMPT_BYTES <= len(held)]
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"held-out {len(held)} bytes; {len(prompts)} prompts x {args.tokens} greedy tokens; "
          f"MatMulNBits block {args.block_size}, accuracy_level {args.accuracy_level}, "
          f"{'symmetric' if args.symmetric else 'asymmetric'}", flush=True)
    print("| model | dtype | model.onnx bytes | MatMulNBits nodes | held-out bpb | / fp32 | greedy agreement with fp32 | first divergence |")
    print("|---|---|---|---|---|---|---|---|")
    for model_type in args.model_types.split(","):
        ckpt = args.fixtures / f"{model_type}-bytes"
        dirs = {dtype: export_model(ckpt, args.work / f"{model_type}-{dtype}", dtype=dtype, force=True)
                for dtype in ("fp32", "fp16")}
        for name, bits in (("int8", 8), ("int4", 4)):
            dirs[name] = quantize_by_hand(dirs["fp32"], args.work / f"{model_type}-{name}", bits, args.block_size,
                                          args.accuracy_level, args.symmetric)
        models = {k: ExportedModel(v, threads=args.threads) for k, v in dirs.items()}
        base = None
        for dtype, model in models.items():
            bpb = bits_per_byte(model, held)
            base = base or bpb
            agree = greedy_agreement(models["fp32"], model, prompts, args.tokens) if dtype != "fp32" else None
            size = (dirs[dtype] / "model.onnx").stat().st_size
            print(f"| {model_type} | {dtype} | {size} | {op_count(dirs[dtype] / 'model.onnx', 'MatMulNBits')} | "
                  f"{bpb:.4f} | {bpb / base:.4f} | {f'{agree.fraction:.3f}' if agree else '-'} | "
                  f"{agree.first_divergence if agree else '-'} |", flush=True)


if __name__ == "__main__":
    main()
