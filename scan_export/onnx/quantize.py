"""Weight-only quantization of a written export: every weight MatMul becomes com.microsoft MatMulNBits.

The weights are quantized by onnxruntime's own quantizer (MatMulNBitsQuantizer, RTN), symmetric,
block-wise along K: w ≈ (q − 2^(bits−1)) · scale per block of `block_size` input features. The
tied embedding is quantized once: the lm_head is a MatMulNBits on the table (its rows are the
lm_head's N outputs, blocked along hidden, exactly MatMulNBits' layout), and the input embedding is
a GatherBlockQuantized reading the same packed bytes and the same scales (docs/quantization.md).
Symmetric because the zero points of the two ops are packed differently for 4 bits, and with no
zero points both ops default to 2^(bits−1): one set of bytes serves both.

accuracy_level says how MatMulNBits treats its activation: 0 unset, 1 fp32, 2 fp16, 3 bf16 keep it in
floating point; 4 quantizes it to int8 per block and runs integer dot products. Measured, 130m shape,
2 threads, one run (docs/quantization.md): int8 weights at levels 0-3 decode ~25x slower than at
level 4 (1286-1358 against 52 ms/token: no CPU kernel for int8 weights with float activations), so
they are refused; int4 at levels 0-3 is 2.2-2.5x slower than at level 4 (about fp32 speed) but
exact in its activation, so it is allowed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ScanExportError

QUANTIZE = {"none": None, "int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: unset, fp32, fp16, bf16, int8
# (bits, accuracy_level) -> why it is refused: measured, 130m shape, 2 threads (docs/quantization.md).
PATHOLOGICAL = {(8, lvl): "int8 weights with float activations have no fast CPU kernel in onnxruntime 1.32 (130m "
                          "decode measured ~25x slower than at accuracy level 4)" for lvl in (0, 1, 2, 3)}
MS_DOMAIN = "com.microsoft"


def check_quantize_args(quantize: str, block_size: int | None, accuracy_level: int | None, dtype: str,
                        flags: dict | None = None) -> None:
    """One-line ScanExportError for a bad combination, before any work. flags: how to name each
    argument ({"block_size": "--block-size", ...}, the CLI's), default their Python names."""
    f = {k: (flags or {}).get(k, k) for k in ("quantize", "block_size", "accuracy_level", "dtype")}
    if quantize not in QUANTIZE:
        raise ScanExportError(f"{f['quantize']}: expected one of {list(QUANTIZE)}, got {quantize!r}")
    if QUANTIZE[quantize] is None:
        given = [f[k] for k, v in (("block_size", block_size), ("accuracy_level", accuracy_level)) if v is not None]
        if given:
            raise ScanExportError(f"{', '.join(given)} only apply with {f['quantize']} int8 or int4, "
                                  f"got {f['quantize']} {quantize}")
        return
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 16 or block_size & (block_size - 1)):
        raise ScanExportError(f"{f['block_size']}: expected a power of two >= 16 (16, 32, 64, 128, ...), "
                              f"got {block_size!r}")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise ScanExportError(f"{f['accuracy_level']}: expected one of {list(ACCURACY_LEVELS)} (0 unset, 1 fp32, "
                              f"2 fp16, 3 bf16, 4 int8), got {accuracy_level!r}")
    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    if (QUANTIZE[quantize], level) in PATHOLOGICAL:
        raise ScanExportError(f"{f['accuracy_level']} {level} with {f['quantize']} {quantize}: "
                              f"{PATHOLOGICAL[QUANTIZE[quantize], level]}; use {f['accuracy_level']} "
                              f"{DEFAULT_ACCURACY_LEVEL} (the default)")
    if dtype != "fp32":
        raise ScanExportError(f"{f['quantize']} {quantize} needs {f['dtype']} fp32 (float32 activations, quantized "
                              f"weights), got {f['dtype']} {dtype}: fp16 activations with MatMulNBits are not "
                              f"supported by scan-export")


def check_block_size(block_size: int | None, hidden_size: int, tied: bool, flag: str = "--block-size") -> None:
    """The block must fit the model: a tied embedding is read back by GatherBlockQuantized in whole
    blocks of hidden (so the block divides hidden_size), and a block longer than hidden only pads
    (2**40 tried to allocate 1 PiB). Checked once the config is read, before any tracing."""
    size = block_size or DEFAULT_BLOCK_SIZE
    if size > hidden_size or (tied and hidden_size % size):
        need = "divides" if tied else "is at most"
        raise ScanExportError(f"{flag}: expected a power of two that {need} the model's hidden_size {hidden_size}"
                              f"{' (its embedding is tied to the lm_head)' if tied else ''}, got {size}")


def _quantizer():
    """onnxruntime's quantizer module, with its per-node INFO lines (it sets up logging at INFO on
    import) turned down to warnings."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    # Its import calls logging.basicConfig(level=INFO): that would make every library's INFO lines
    # (onnx_ir's, in later exports) print in the user's process. Undo it.
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _quantizer_config(bits: int, block_size: int, accuracy_level: int):
    DefaultWeightOnlyQuantConfig = _quantizer().DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                        bits=bits, op_types_to_quantize=("MatMul",))


def _weight_matmuls(graph: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
    """Top-level MatMuls whose B is a 2-D float initializer: the nn.Linear weights (never a
    scan body's constants, which live in subgraphs)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return [n for n in graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type in floats]


def _tied_embedding(graph: onnx.GraphProto, inits: dict):
    """(gather, transpose, lm_head) when the embedding table feeds both the input Gather and the
    lm_head (MatMul of Transpose(table)), else None."""
    for t in graph.node:
        if t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        users = [n for n in graph.node if t.input[0] in n.input]
        gathers = [n for n in users if n.op_type == "Gather" and n.input[0] == t.input[0]]
        heads = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] == t.output[0]]
        if len(users) == 2 and len(gathers) == 1 and len(heads) == 1 and "logits" in heads[0].output:
            return gathers[0], t, heads[0]
    return None


def quantize_proto(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int) -> dict:
    """Quantize model (loaded with its weights) in place; returns what was done, for scan_export.json."""
    q = _quantizer()
    DefaultWeightOnlyQuantizer, MatMulNBitsQuantizer = q.DefaultWeightOnlyQuantizer, q.MatMulNBitsQuantizer
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    tensors = [n.input[1] for n in _weight_matmuls(graph, inits)]
    record = {"method": "MatMulNBits", "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
              "symmetric": True, "quantizer": "onnxruntime MatMulNBitsQuantizer (RTN)"}
    tied = _tied_embedding(graph, inits)
    if tied is not None:
        gather, transpose, head = tied
        table = inits[gather.input[0]]
        vocab, hidden = table.dims
        w = numpy_helper.to_array(table)
        # (K, N) = (hidden, vocab) in: packed (vocab, k_blocks, blob), scales (vocab, k_blocks) out.
        packed, scales, _ = DefaultWeightOnlyQuantizer(_quantizer_config(bits, block_size, accuracy_level)) \
            .qbits_block_quant(np.ascontiguousarray(w.T))
        name = table.name
        q_name, s_name, s3_name, shape3, shape_out = (f"{name}_Q{bits}", f"{name}_scales", f"{name}_scales_3d",
                                                      f"{name}_scales_3d_shape", f"{name}_gathered_shape")
        graph.initializer.remove(table)
        graph.initializer.extend([
            numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales.astype(w.dtype), s_name),
            numpy_helper.from_array(np.array([vocab, scales.shape[1], 1], np.int64), shape3),
            # (b, l, k_blocks, block) -> (b, l, hidden): 0 copies the ids' two dims.
            numpy_helper.from_array(np.array([0, 0, hidden], np.int64), shape_out),
        ])
        nodes = list(graph.node)
        lm = helper.make_node("MatMulNBits", [head.input[0], q_name, s_name], list(head.output), name=head.name + "_Q",
                              domain=MS_DOMAIN, K=hidden, N=vocab, bits=bits, block_size=block_size,
                              accuracy_level=accuracy_level)
        # GatherBlockQuantized wants scales of data's rank: (vocab, k_blocks, 1), one block per (row, k_block).
        emb = [helper.make_node("Reshape", [s_name, shape3], [s3_name], name=gather.name + "_scales"),
               helper.make_node("GatherBlockQuantized", [q_name, gather.input[1], s3_name], [gather.output[0] + "_blocks"],
                                name=gather.name + "_Q", domain=MS_DOMAIN, bits=bits, block_size=block_size,
                                gather_axis=0, quantize_axis=2),
               helper.make_node("Reshape", [gather.output[0] + "_blocks", shape_out], list(gather.output),
                                name=gather.name + "_reshape")]
        at_g, at_h = nodes.index(gather), nodes.index(head)
        out = []
        for i, n in enumerate(nodes):
            if n is transpose:
                continue
            out.extend(emb if i == at_g else [lm] if i == at_h else [n])
        del graph.node[:]
        graph.node.extend(out)
        record["embedding"] = {"tensor": name, "shared_with": "lm_head",
                               "ops": "GatherBlockQuantized (input) and MatMulNBits (lm_head) on one packed table"}
        tensors.append(name)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    names = [n.name for n in _weight_matmuls(graph, {t.name: t for t in graph.initializer})]
    if names:
        quantizer = MatMulNBitsQuantizer(model, nodes_to_include=names,
                                         algo_config=_quantizer_config(bits, block_size, accuracy_level))
        quantizer.process()
        quantized = quantizer.model.model
        if quantized is not model:
            model.CopyFrom(quantized)
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name in names]
    if left:
        raise RuntimeError(f"the quantizer left weight MatMuls unquantized: {left[:4]}")  # a bug, not a user mistake
    record["tensors"] = tensors
    return record


def quantize_file(path, bits: int, block_size: int, accuracy_level: int, *, single_file: bool) -> dict:
    """Quantize the model written at path in place (one file, or + path.data), check it, and return
    the record. The fp32 weights are loaded once (a quantized export is not memory-lean)."""
    from .proto_assembly import DATA_SUFFIX

    path = Path(path)
    model = onnx.load(str(path))
    data = path.with_name(path.name + DATA_SUFFIX)
    record = quantize_proto(model, bits, block_size, accuracy_level)
    if data.exists():
        data.unlink()
    if single_file:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    record["node_count"] = len(model.graph.node)
    return record


# Targets whose runtime lacks a kernel a quantized export uses: {target: why}. onnxruntime-node and
# -web 1.30 run MatMulNBits and GatherBlockQuantized (tests/test_deploy.py); onnxruntime 1.18
# predates 8-bit MatMulNBits and packed-uint8 GatherBlockQuantized.
QUANTIZE_REFUSED_TARGETS = {"ort-1.18": "onnxruntime 1.18 lacks 8-bit MatMulNBits and uint8 GatherBlockQuantized"}


def check_target_quantize(target, quantize: str) -> None:
    why = QUANTIZE_REFUSED_TARGETS.get(target.name)
    if QUANTIZE.get(quantize) is not None and why:
        raise ScanExportError(f"target {target.name!r} cannot run quantize {quantize} exports: {why}; use the "
                              f"portable target (onnxruntime >= 1.30, onnxruntime-node/web 1.30)")
