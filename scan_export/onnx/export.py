"""PyTorch -> ONNX mechanics: dynamo export, lowering of our custom nodes, target pinning, atomic save."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import onnx
from onnx import helper

from .lowering.graph_builder import GraphBuilder
from .lowering.causal_conv import emit_causal_conv
from .lowering.moe import emit_moe_experts
from .lowering.selective_scan import SelectiveScanConfig, emit_selective_scan
from .lowering.ssd import SSDConfig, emit_ssd_scan
from .output_dir import check_output_file, write_file_atomically
from .ops import ONNX_DOMAIN, SCAN_INPUTS, SSD_INPUTS, onnx_translation_table
from .targets import DEFAULT_SCAN_FORM, DEFAULT_TARGET, MIN_OPSET, resolve_target
from ..errors import ScanExportError


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def lower_custom_ops(model: onnx.ModelProto, lowering: str = "portable",
                     scan_form: str = DEFAULT_SCAN_FORM) -> onnx.ModelProto:
    """Replace each scan_export.SelectiveScan / SSDScan node with its lowering, in place.

    lowering: "portable" (SSD: Loop over chunks; Slice/Mul/Add conv) or "native" (opset 27
    LinearAttention for SSD scans, CausalConvWithState for convs; Mamba-1 scans stay portable).
    scan_form: how Mamba-1 scans are lowered, "sequential" (a Scan over time) or "chunked"
    (a Loop over chunks); see lowering/selective_scan.py."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = model.graph
    new_nodes = []
    for k, node in enumerate(graph.node):
        if node.domain != ONNX_DOMAIN:
            new_nodes.append(node)
            continue
        if node.op_type == "MoeExperts":  # no opset condition: standard ops since opset 13 (Split's num_outputs: 18)
            gb = GraphBuilder(f"moe_{k}")
            out = emit_moe_experts(gb, *node.input, elem_type=_value_type(graph, node.input[0]),
                                   activation=_attrs(node).get("activation", b"swiglu").decode())
            gb.nodes.append(helper.make_node("Identity", [out], [node.output[0]], name=gb.name("out")))
            new_nodes.extend(gb.nodes)
            continue
        if node.op_type not in ("SelectiveScan", "SSDScan", "CausalConv"):
            raise ScanExportError(f"unknown {ONNX_DOMAIN} node {node.op_type!r}")
        if opset < MIN_OPSET:
            raise ScanExportError(f"the scan lowerings need opset >= {MIN_OPSET}, the model has {opset}")
        a = _attrs(node)
        if node.op_type == "CausalConv":
            gb = GraphBuilder(f"causal_conv_{k}")
            ins = [i or None for i in node.input] + [None] * (4 - len(node.input))
            out, last_state = emit_causal_conv(gb, a["kernel"], *ins, lowering=lowering)
        elif node.op_type == "SelectiveScan":
            cfg = SelectiveScanConfig(
                io_dtype=a["io_dtype"], bc_layout=a["bc_layout"].decode() if isinstance(a["bc_layout"], bytes) else a["bc_layout"],
                delta_softplus=bool(a["delta_softplus"]), chunk_size=a["chunk_size"], form=scan_form,
            )
            gb = GraphBuilder(f"selective_scan_{k}")
            out, last_state = emit_selective_scan(gb, cfg, **dict(zip(SCAN_INPUTS, [i or None for i in node.input])))
        else:
            cfg = SSDConfig(io_dtype=a["io_dtype"], chunk_size=a["chunk_size"], dt_softplus=bool(a["dt_softplus"]),
                            dt_limit=(a["dt_limit_lo"], a["dt_limit_hi"]), d_per_channel=bool(a["d_per_channel"]),
                            lowering=lowering, heads=a.get("heads") or None, state_round=a.get("state_round", 0))
            gb = GraphBuilder(f"ssd_scan_{k}")
            out, last_state = emit_ssd_scan(gb, cfg, **dict(zip(SSD_INPUTS, [i or None for i in node.input])))
        # Route the lowering's results to the names the rest of the graph already uses.
        gb.nodes.append(helper.make_node("Identity", [out], [node.output[0]], name=gb.name("out")))
        if len(node.output) > 1 and node.output[1]:
            gb.nodes.append(helper.make_node("Identity", [last_state], [node.output[1]], name=gb.name("last_state")))
        new_nodes.extend(gb.nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in model.opset_import if o.domain != ONNX_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def _value_type(graph: onnx.GraphProto, name: str) -> int:
    """The element type of a value of the top graph (the exporter types every value it emits)."""
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.name == name:
            return v.type.tensor_type.elem_type
    for t in graph.initializer:
        if t.name == name:
            return t.data_type
    raise RuntimeError(f"no type recorded for {name!r}")  # a bug, not a user mistake


WRITER_KEY = "scan_export.written_by"  # metadata on every model file we write, so a re-run may replace it


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, check: bool = True, force: bool = False) -> Path:
    """Check (full, with shape inference) and write atomically: a failed or interrupted save leaves no
    partial file. An existing file is replaced only when scan_export wrote it or force is set."""
    from .. import __version__

    path = check_output_file(path, force=force, ours=written_by_us)
    if check:
        onnx.checker.check_model(model, full_check=True)
    if not any(p.key == WRITER_KEY for p in model.metadata_props):
        model.metadata_props.add(key=WRITER_KEY, value=f"scan-export {__version__}")
    return write_file_atomically(path, lambda tmp: onnx.save_model(model, tmp))


def written_by_us(path: Path) -> bool:
    """True when path is an ONNX model scan_export wrote (its metadata carries one of our keys)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all: certainly not ours
        return False
    return any(p.key.startswith("scan_export.") for p in model.metadata_props)


def export(module, args, path=None, *, kwargs=None, dynamic_shapes=None, input_names=None,
           output_names=None, target: str = DEFAULT_TARGET, opset: int | None = None,
           lowering: str = "portable", scan_form: str = DEFAULT_SCAN_FORM, weights=None,
           progress=None) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) with scan_export's ops lowered, pinned to a target.

    lowering applies to Mamba-2 (SSD) scans: "portable" (Loop over chunks, opset >= 18) or
    "native" (ONNX opset 27 LinearAttention; needs a target such as ort-1.32).
    scan_form applies to Mamba-1 scans: "sequential" (default) or "chunked".
    weights (whole-model export, fake_params.py): a CheckpointWeights for a module traced with fake
    parameters; they are written to weights.data_path as the graph's external data right after
    tracing, and the returned proto refers to that file (it is checked where it is saved, by
    weights.finish, not here). progress: a progress.Progress called as each step starts and ends.
    Returns the ModelProto and, when path is given, writes it there atomically.
    """
    import onnx_ir as ir
    import onnxscript
    import torch

    from ..progress import silent

    progress = progress or silent
    tgt = resolve_target(target, opset, lowering=lowering)
    if path is not None:  # refuse a bad path before the export's work, not after
        check_output_file(path, ours=written_by_us)
    if weights is not None and path is not None:
        raise ValueError("export: weights (external data) and path exclude each other")  # a bug, not a user mistake
    progress("tracing", 0, None)
    with _quiet_exporter():
        program = _torch_export(torch, module, args, kwargs, dynamic_shapes, input_names, output_names, tgt)
    progress("tracing", 1, 1)
    if weights is not None:
        weights.attach(program.model, progress)
    progress("lowering", 0, None)
    model = lower_custom_ops(program.model_proto, lowering=lowering, scan_form=scan_form)
    del program
    progress("lowering", 1, 1)
    progress("optimizing", 0, None)
    ir_model = ir.serde.deserialize_model(model)
    del model
    if weights is not None:  # the graph's external data lies next to where the model will be saved
        ir.external_data.set_base_dir(ir_model.graph, weights.base_dir)
    onnxscript.optimizer.optimize(ir_model)  # in place; what optimize(proto) does between (de)serializing
    model = ir.serde.serialize_model(ir_model)
    del ir_model
    progress("optimizing", 1, 1)
    model.ir_version = tgt.ir_version
    if weights is None:
        progress("checking", 0, None)
        onnx.checker.check_model(model, full_check=True)
        progress("checking", 1, 1)
    if path is not None:
        save_model(model, path, check=False)
    return model


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporter's notices a user can do nothing about ("torchvision is not installed.
    Skipping torchvision::nms", pytree FutureWarnings); real errors still raise."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def _torch_export(torch, module, args, kwargs, dynamic_shapes, input_names, output_names, tgt):
    from ..reference.custom_ops import opaque_ops

    with opaque_ops():  # our ops stay custom nodes here (a plain export would trace export_bodies)
        return torch.onnx.export(
            module, tuple(args), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
            input_names=input_names, output_names=output_names, opset_version=tgt.opset,
            custom_translation_table=onnx_translation_table(), verbose=False,
            # Optimize only after lowering: the optimizer's shape inference cannot type our custom
            # node's outputs and would erase the types the translation set.
            optimize=False,
        )
