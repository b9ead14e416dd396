"""Whole-model export: a local HF Mamba / FalconMamba / Mamba2 checkpoint -> OUT_DIR with one ONNX graph.

The graph serves prefill (any l) and decode (l = 1) alike; the state goes in and out per layer:

  inputs   input_ids: (batch, seqlen) int64
           past.{i}.conv_state: (batch, K−1, conv_dim) model dtype
           past.{i}.ssm_state: (batch, n, d_inner) float32 (Mamba-1) | (batch, heads, head_dim, n) (Mamba-2)
           logits_to_keep: () int64: 0 = logits for every position; k > 0 = the last k
  outputs  logits: (batch, seqlen or min(k, seqlen), vocab)
           present.{i}.conv_state, present.{i}.ssm_state (same shapes as the inputs)

OUT_DIR holds model.onnx (+ model.onnx.data past 2 GB), scan_export.json (the I/O contract that
runtime.generate and the Node/web hosts read), the checkpoint's tokenizer files, and with
--target genai a genai_config.json for onnxruntime-genai (genai_config.py).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import onnx

from ..errors import ScanExportError
from ..resources import require_memory
# The contract's names live with its reader.
from ..contract import (ATTENTION_MASK, DESCRIPTION_FILE, LOGITS_TO_KEEP, MODEL_FILE, TOKENIZER_FILES, cache_names, describe,
                        describe_hybrid)
from .checkpoint import resolve_checkpoint
from .genai_config import GENAI_CONFIG_FILE, genai_config
from .output_dir import HASHES, OWNER_FILE, check_room, hash_files, plan_output_dir, staged_output
from .quantize import (DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, QUANTIZE, check_block_size, check_quantize_args,
                       check_target_quantize, quantize_file)
from .targets import DEFAULT_SCAN_FORM, DEFAULT_TARGET, SCAN_FORMS, resolve_target

EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GiB limit, with headroom for the graph itself
DTYPES = {"fp32": "float32", "fp16": "float16"}
# The genai target's logits_to_keep default: every position, the logits shape genai binds.
GENAI_LOGITS_TO_KEEP = 0


def add_logits_to_keep(model: onnx.ModelProto, default: int | None = None) -> onnx.ModelProto:
    """Give the graph transformers' logits_to_keep: an int64 scalar input; 0 keeps every position's
    logits, k > 0 restricts the lm_head to the last k positions.

    Generation needs only the last position's logits after a prefill; computing all of them costs
    a (l, hidden) x (hidden, vocab) MatMul (15% of a 130m prefill at l = 512) and an (l, vocab)
    output (100 MB at l = 512). It is a plain required input, not an initializer-backed default:
    onnxruntime-web 1.30 refuses to feed those ("invalid input"). default (the genai target only)
    backs it with an initializer for hosts that never feed it (onnxruntime-genai)."""
    from onnx import TensorProto, helper

    from .lowering.graph_builder import INT64_MAX, GraphBuilder

    graph = model.graph
    lm_head = next(n for n in graph.node if "logits" in n.output)
    if lm_head.op_type in ("Div", "Mul"):  # logits / logits_scaling (granite): slice before the MatMul feeding it
        lm_head = next(n for n in graph.node if lm_head.input[0] in n.output)
    if lm_head.op_type != "MatMul":
        raise RuntimeError(f"expected the logits to come from a MatMul, got {lm_head.op_type}")  # a bug, not a user mistake
    gb = GraphBuilder("logits_to_keep")
    hidden = lm_head.input[0]  # (b, l, hidden)
    k = gb.op("Reshape", LOGITS_TO_KEEP, gb.ints(1))
    l_ = gb.op("Slice", gb.op("Shape", hidden), gb.ints(1), gb.ints(2))
    last_k = gb.op("Max", gb.op("Sub", l_, k), gb.ints(0))  # k > l keeps all l
    start = gb.op("Where", gb.op("Greater", k, gb.ints(0)), last_k, gb.ints(0))
    lm_head.input[0] = gb.op("Slice", hidden, start, gb.ints(INT64_MAX), gb.ints(1))
    nodes = list(graph.node)
    at = nodes.index(lm_head)
    del graph.node[:]
    graph.node.extend(nodes[:at] + gb.nodes + nodes[at:])
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    if default is not None:
        graph.initializer.append(helper.make_tensor(LOGITS_TO_KEEP, TensorProto.INT64, [], [default]))
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_len"
    return model


def _value_infos(graph: onnx.GraphProto):
    """Every ValueInfoProto of a graph and of its subgraphs (Scan / Loop / If bodies)."""
    yield from (*graph.input, *graph.output, *graph.value_info)
    for node in graph.node:
        for attr in node.attribute:
            for g in (attr.g,) if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _value_infos(g)


def name_dims(model: onnx.ModelProto, description: dict) -> onnx.ModelProto:
    """Name each dynamic dim of the graph's inputs and outputs as the description does (batch,
    seqlen, logits_len), and rename the same symbols everywhere else in the graph.

    Hosts that match dimension names (onnxruntime-genai, free-dimension overrides) need one name
    per axis. torch's exporter takes the names from dynamic_shapes; this pass maps whatever symbol
    sits where the description has a name, so it holds even if the exporter leaves `s41`-style
    symbols, and raises (a bug, not a user mistake) if a dim the description calls dynamic came out
    fixed, or if one symbol stands for two names."""
    want = {v["name"]: v["shape"] for v in (*description["inputs"], *description["outputs"])}
    rename = {}
    for v in (*model.graph.input, *model.graph.output):
        dims = v.type.tensor_type.shape.dim
        shape = want[v.name]
        if len(dims) != len(shape):
            raise RuntimeError(f"graph {v.name} has rank {len(dims)}, the description says {shape}")
        for d, w in zip(dims, shape):
            if not isinstance(w, str):
                if d.dim_value != w:
                    raise RuntimeError(f"graph {v.name} has shape {dims}, the description says {shape}")
            elif d.HasField("dim_value"):
                raise RuntimeError(f"graph {v.name}: the exporter fixed the {w} dim at {d.dim_value}")
            elif not d.dim_param:
                d.dim_param = w
            elif rename.setdefault(d.dim_param, w) != w:
                raise RuntimeError(f"graph symbol {d.dim_param!r} stands for both {rename[d.dim_param]} and {w}")
    rename = {old: new for old, new in rename.items() if old != new}
    if rename:
        # Whole symbols only, also inside expressions such as "s41*s70".
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
        for v in _value_infos(model.graph):
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = pattern.sub(lambda m: rename[m.group(1)], d.dim_param)
    return model


def export_model(checkpoint_dir, out_dir, *, dtype: str = "fp32", target: str = DEFAULT_TARGET,
                 opset: int | None = None, external_data_bytes: int = EXTERNAL_DATA_BYTES,
                 example_seqlen: int = 8, lowering: str | None = None, scan_form: str | None = None,
                 force: bool = False, revision: str | None = None, quantize: str = "none",
                 block_size: int | None = None, accuracy_level: int | None = None, progress=None) -> Path:
    """Export a checkpoint into out_dir and return its path. checkpoint_dir: a local directory, or a
    Hugging Face Hub id ORG/NAME (at `revision`) fetched with huggingface_hub (checkpoint.py).

    out_dir may be new, empty, or a previous export (only the files that export wrote are replaced
    or removed); anything else is refused before any work starts unless force is set, and even then
    only our own file names are written (output_dir.py). Everything is written into a hidden staging
    directory first and moved into place only when export, checks and description all succeeded.
    lowering (Mamba-2 only): "portable" (default) or "native"; scan_form (Mamba-1 only):
    "sequential" (default) or "chunked". Asking for one on the other family is refused.
    progress: a progress.Progress (default: silent), called as each long step starts and ends.
    quantize: "none" (default), "int8" or "int4": weight-only MatMulNBits after the model is written
    (quantize.py), in blocks of block_size (default 32) at accuracy_level (default 4); fp32 only.
    The weights are never all in memory: the model is traced with fake parameters and the weights
    stream from the checkpoint into the output file (fake_params.py).
    """
    import torch

    from ..progress import silent
    from ..reference.models import checked_config
    from ..reference.models.families import GATED_DELTA, NO_SCAN, SELECTIVE_SCAN, SSD
    from ..reference.models.families import get as family_of
    from ..reference.models.config import lower_bound_bytes
    from .export import export
    from .fake_params import fake_model
    from .proto_assembly import DATA_SUFFIX, model_bytes

    if dtype not in DTYPES:
        raise ScanExportError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if scan_form is not None and scan_form not in SCAN_FORMS:
        raise ScanExportError(f"scan_form: expected one of {list(SCAN_FORMS)}, got {scan_form!r}")
    check_quantize_args(quantize, block_size, accuracy_level, dtype)
    checkpoint_dir = resolve_checkpoint(checkpoint_dir, revision)
    raw_config = checked_config(checkpoint_dir)  # one validation pass over config.json, before any work
    model_type = raw_config.get("model_type")
    family = family_of(model_type)  # checked_config has refused any other
    hybrid = family.hybrid
    mamba2_scans = family.scan == SSD
    if lowering not in (None, "portable") and not mamba2_scans:
        raise ScanExportError(f"lowering {lowering!r} applies to Mamba-2 scans only; checkpoint {str(checkpoint_dir)!r} "
                              f"is {model_type!r}, whose scan has one lowering (leave --lowering out)")
    if scan_form is not None and family.scan != SELECTIVE_SCAN:
        why = {SSD: "whose scan is always chunked", NO_SCAN: "which has no scan",
               GATED_DELTA: "whose delta rule has one export form"}[family.scan]
        raise ScanExportError(f"scan_form applies to Mamba-1 scans only; checkpoint {str(checkpoint_dir)!r} is "
                              f"{model_type!r}, {why} (leave --scan-form out)")
    lowering = lowering or "portable"
    scan_form = scan_form or DEFAULT_SCAN_FORM
    tgt = resolve_target(target, opset, lowering=lowering)
    check_target_quantize(tgt, quantize)
    copies = {name: Path(checkpoint_dir) / name for name in TOKENIZER_FILES if (Path(checkpoint_dir) / name).is_file()}
    plan = plan_output_dir(out_dir, force=force, protected={checkpoint_dir: "the checkpoint directory being exported"},
                           writes={MODEL_FILE, DESCRIPTION_FILE, *([GENAI_CONFIG_FILE] if tgt.genai else [])},
                           copies=copies)
    least = lower_bound_bytes(raw_config, 2 if dtype == "fp16" else 4)
    check_room(plan, least, single_file=least <= external_data_bytes)  # before anything is built
    progress = progress or silent
    progress("loading", 0, None)
    model, weights = fake_model(checkpoint_dir, getattr(torch, DTYPES[dtype]))  # parameters: fake tensors
    progress("loading", 1, 1)
    cfg = model.cfg
    size = weights.total_bytes()  # what model.onnx(.data) will hold, from the checkpoint's headers
    check_room(plan, size, single_file=size <= external_data_bytes)
    if QUANTIZE[quantize] is not None:
        # The fp32 weights and their quantized copy are in memory together (quantize_file).
        require_memory(2 * size, f"--quantize {quantize}", "export without --quantize, or on a larger machine")
        check_block_size(block_size, cfg.hidden_size, bool(cfg.tie_word_embeddings))
    example_ids = torch.zeros(2, example_seqlen, dtype=torch.long)
    if hybrid:
        # A few cached positions in the example keep past_seqlen dynamic (0 and 1 would specialize).
        names = cache_names(cfg)
        example_past = 3
        example_state = model.zero_state(2, past_seqlen=example_past)
        example_args = (example_ids, torch.ones(2, example_past + example_seqlen, dtype=torch.long), *example_state)
        grows = ["past_seqlen" in shape for _, _, tensors in cfg.cache_layout() for _, shape, _ in tensors]
        dynamic_shapes = ({0: "batch", 1: "seqlen"}, {0: "batch", 1: "total_seqlen"},
                          tuple({0: "batch", 2: "past_seqlen"} if g else {0: "batch"} for g in grows))
        input_names = ["input_ids", ATTENTION_MASK, *(i for i, _ in names)]
    else:
        names = cache_names(cfg)
        example_state = model.zero_state(2)
        example_args = (example_ids, *example_state)
        # forward(ids, *states). Named axes: torch's exporter writes these names into the graph (and
        # name_dims below enforces them); with Dim.DYNAMIC it leaves a symbol per input (s41, s3, ...).
        dynamic_shapes = ({0: "batch", 1: "seqlen"}, tuple({0: "batch"} for _ in example_state))
        input_names = ["input_ids", *(i for i, _ in names)]
    with staged_output(plan) as staging:  # SIGTERM/SIGHUP raise from here on, so staging is always cleaned up
        weights.data_path = staging / (MODEL_FILE + DATA_SUFFIX)
        with torch.no_grad(), warnings.catch_warnings():
            # Every state's batch is the same symbol as input_ids' batch, so torch warns that it
            # "will not use" the name batch for them: it already does.
            warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape constraints")
            proto = export(
                model, example_args, dynamic_shapes=dynamic_shapes, target=tgt.name, opset=tgt.opset,
                lowering=lowering, scan_form=scan_form,
                input_names=input_names, output_names=["logits", *(o for _, o in names)],
                weights=weights, progress=progress,
            )
        written_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if written_opset != tgt.opset:  # a bug (resolve_target bounds the opset): never describe what we did not write
            raise RuntimeError(f"asked the exporter for opset {tgt.opset}, it wrote {written_opset}")
        add_logits_to_keep(proto, default=GENAI_LOGITS_TO_KEEP if tgt.genai else None)
        if hybrid:
            description = describe_hybrid(cfg, DTYPES[dtype], tgt, len(proto.graph.node))
        else:
            description = describe(cfg, DTYPES[dtype], tgt, len(proto.graph.node),
                                   logits_to_keep_default=GENAI_LOGITS_TO_KEEP if tgt.genai else None)
        name_dims(proto, description)
        # Checked (full) where it is written; one file up to protobuf's limit, else + model.onnx.data.
        single_file = model_bytes(proto) <= external_data_bytes
        weights.finish(proto, staging / MODEL_FILE, single_file=single_file, progress=progress)
        if weights.nonfinite:  # loadable, so a warning, once: the user may be exporting a broken fine-tune
            more = f" (and {len(weights.nonfinite) - 1} more)" if len(weights.nonfinite) > 1 else ""
            print(f"scan-export: warning: weight {weights.nonfinite[0]}{more} in {str(checkpoint_dir)!r} holds NaN "
                  f"or Inf; the export's logits will be NaN", file=sys.stderr)
        if QUANTIZE[quantize] is not None:
            progress("quantizing", 0, None)
            record = quantize_file(staging / MODEL_FILE, QUANTIZE[quantize], block_size or DEFAULT_BLOCK_SIZE,
                                   DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level,
                                   single_file=single_file)
            description["node_count"] = record.pop("node_count")
            description["quantization"] = record
            progress("quantizing", 1, 1)
        description["lowering"] = lowering
        if family.scan == SELECTIVE_SCAN:
            description["scan_form"] = scan_form
        if tgt.genai:
            genai = genai_config(description, MODEL_FILE, checkpoint_dir)
            (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=2))
        for name, src in copies.items():
            shutil.copyfile(src, staging / name)  # not copy2: the source's 0600 must not carry over
        written = sorted(p.name for p in staging.iterdir() if p.name != OWNER_FILE)
        description["files"] = sorted([*written, DESCRIPTION_FILE])
        # What proves a file ours to a later export into this directory (output_dir.py).
        # The data file's was taken while it was written, unless quantizing rewrote the files since.
        known = ({weights.data_path.name: weights.data_digest}
                 if weights.data_digest is not None and QUANTIZE[quantize] is None else {})
        description[HASHES] = hash_files(staging, written, known)
        (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))
    return plan.dest
