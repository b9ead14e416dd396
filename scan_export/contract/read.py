"""Reading scan_export.json safely, and checking the graph onnxruntime loaded against it.

onnx/model_export.py writes what these check; runtime/generate.py and the hosts' tests read it. A
description that is not what we write is refused with one line naming the file and the field,
never a KeyError deep inside generation.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ScanExportError, describe_value, read_json_object
from .names import DESCRIPTION_FILE, DIM_NAMES, FORMAT, STATE_DTYPES, SUPPORTED_VERSIONS

REQUIRED = {"model_file": str, "model_type": str, "dtype": str, "vocab_size": int, "num_layers": int,
            "inputs": list, "outputs": list, "state": list}


def plain_name(name) -> bool:
    """A name that means one file directly inside the export directory: no path, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _tensor_entry_problem(entry) -> str | None:
    """Why an inputs/outputs entry is not {name: str, shape: [str | int >= 0], dtype: known}, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return "with a string name"
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(x in DIM_NAMES if isinstance(x, str) else
                                              (isinstance(x, int) and not isinstance(x, bool) and x >= 0) for x in shape):
        return f"with a shape of sizes >= 0 and dim names from {list(DIM_NAMES)}"
    if entry["name"] != "input_ids" and entry.get("dtype") not in (*STATE_DTYPES, "int64"):
        return f"with a dtype in {[*STATE_DTYPES, 'int64']}"
    return None


def read_description(export_dir) -> dict:
    """export_dir/scan_export.json, checked field by field. Raises ScanExportError naming what is wrong."""
    export_dir = Path(export_dir)
    if not export_dir.exists():
        raise ScanExportError(f"export directory {str(export_dir)!r} does not exist")
    if not export_dir.is_dir():
        raise ScanExportError(f"export directory {str(export_dir)!r} is a file, expected the directory "
                              f"`scan-export export-model` wrote")
    path = export_dir / DESCRIPTION_FILE
    if not path.is_file():
        raise ScanExportError(f"export directory {str(export_dir)!r} has no {DESCRIPTION_FILE}; "
                              f"expected the output of `scan-export export-model`")
    d = read_json_object(path)
    if d.get("format") != FORMAT:
        raise ScanExportError(f"{path}: expected format {FORMAT!r}, got {describe_value(d.get('format'))}")
    if d.get("version") not in SUPPORTED_VERSIONS:
        raise ScanExportError(f"{path}: expected version in {list(SUPPORTED_VERSIONS)}, got "
                              f"{describe_value(d.get('version'))}; a newer scan-export wrote it, upgrade to read it")
    for key, kind in REQUIRED.items():
        if not isinstance(d.get(key), kind) or isinstance(d.get(key), bool):
            raise ScanExportError(f"{path}: field {key!r} expected a {kind.__name__}, got {describe_value(d.get(key))}")
    if d["dtype"] not in STATE_DTYPES:
        raise ScanExportError(f"{path}: field 'dtype' expected one of {list(STATE_DTYPES)}, got {describe_value(d['dtype'])}")
    for side in ("inputs", "outputs"):
        for entry in d[side]:
            problem = _tensor_entry_problem(entry)
            if problem:
                raise ScanExportError(f"{path}: each of {side!r} expected {{name, shape, dtype}} {problem}, got "
                                      f"{describe_value(entry)}")
    for entry in d["state"]:
        tensors = [t for t in entry.values() if isinstance(t, dict)] if isinstance(entry, dict) else None
        if tensors is None or any(not isinstance(t.get("input", ""), str) or not isinstance(t.get("output", ""), str)
                                  for t in tensors):
            raise ScanExportError(f"{path}: each of 'state' expected {{tensor: {{input, output, ...}}}} with names "
                                  f"as strings, got {describe_value(entry)}")
    if d["vocab_size"] < 1:
        raise ScanExportError(f"{path}: field 'vocab_size' expected an int >= 1, got {describe_value(d['vocab_size'])}")
    eos = d.get("eos_token_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < d["vocab_size"]):
        raise ScanExportError(f"{path}: field 'eos_token_id' expected null or a token id in [0, {d['vocab_size']}), "
                              f"got {describe_value(eos)}")
    if not plain_name(d["model_file"]):
        raise ScanExportError(f"{path}: field 'model_file' expected a file name inside the export directory, "
                              f"got {describe_value(d['model_file'])}")
    model = export_dir / d["model_file"]
    if not model.is_file():
        raise ScanExportError(f"{model}: missing; {DESCRIPTION_FILE} names it as the model file")
    if model.stat().st_size == 0:
        raise ScanExportError(f"{model}: empty file, expected an ONNX model (re-run export-model)")
    return d


# onnxruntime's type strings for the description's dtypes.
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


def graph_mismatch(description: dict, session) -> str | None:
    """The first way the graph onnxruntime loaded disagrees with scan_export.json (names, order,
    dtypes, fixed dims, the vocab of the logits, the state list), or None. A model.onnx swapped in
    from another export, or a scan op model, stops here with one line rather than deep in a run."""
    # An input backed by an initializer (the genai target's logits_to_keep, which has a "default")
    # is an overridable initializer to onnxruntime, not one of its inputs.
    inputs = [*session.get_inputs(), *session.get_overridable_initializers()]
    for side, want, got in (("input", description["inputs"], inputs),
                            ("output", description["outputs"], session.get_outputs())):
        graph = {g.name: g for g in got}
        for w in want:
            if not isinstance(w, dict) or not isinstance(w.get("name"), str):
                return f"each of {side}s expected {{name, shape, dtype}}, got {describe_value(w)}"
            g = graph.get(w["name"])
            if g is None:
                return f"{side} {w['name']!r} is in {DESCRIPTION_FILE} but not in the graph (graph {side}s: " \
                       f"{describe_value([x.name for x in got])})"
            if w.get("dtype") in ORT_TYPES and g.type != ORT_TYPES[w["dtype"]]:
                return f"{side} {w['name']!r} has dtype {w['dtype']} in {DESCRIPTION_FILE}, {g.type} in the graph"
            shape = w.get("shape")
            if not isinstance(shape, list) or len(shape) != len(g.shape):
                return f"{side} {w['name']!r} has shape {describe_value(shape)} in {DESCRIPTION_FILE}, {g.shape} in the graph"
            for d, gd in zip(shape, g.shape):
                if (isinstance(d, int) or isinstance(gd, int)) and d != gd:
                    return f"{side} {w['name']!r} has shape {shape} in {DESCRIPTION_FILE}, {g.shape} in the graph"
        extra = [g.name for g in got if g.name not in {w["name"] for w in want}]
        if extra and side == "input":  # an input we would not feed
            return f"graph input {extra[0]!r} is not in {DESCRIPTION_FILE}'s inputs"
    logits = next((g for g in session.get_outputs() if g.name == "logits"), None)
    if logits is None or not logits.shape or logits.shape[-1] != description["vocab_size"]:
        return f"the graph's logits {logits.shape if logits else 'are missing'}, {DESCRIPTION_FILE} says vocab_size " \
               f"{description['vocab_size']}"
    names_in = {w["name"] for w in description["inputs"]}
    names_out = {w["name"] for w in description["outputs"]}
    for entry in description["state"]:
        tensors = [t for t in entry.values() if isinstance(t, dict)] if isinstance(entry, dict) else [None]
        for t in tensors:
            if not isinstance(t, dict) or "input" not in t:
                continue
            if t["input"] not in names_in or t.get("output") not in names_out:
                return f"state {describe_value(t.get('input'))} -> {describe_value(t.get('output'))} is not among " \
                       f"the inputs and outputs"
    return None


def check_graph_matches(description: dict, session, model_path) -> None:
    problem = graph_mismatch(description, session)
    if problem:
        raise ScanExportError(f"{model_path}: does not match its {DESCRIPTION_FILE}: {problem}; expected the "
                              f"model.onnx written with it (re-run export-model)")
