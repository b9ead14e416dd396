"""Fingerprint every model type's export: for a fixed tiny checkpoint (seed 0) and each of fp32 and
int4, the sha256 of model.onnx as written and with the metadata that names source files removed
(torch's exporter records each node's Python stack trace, so moving a module changes those strings
and nothing else). A refactor that must not change the graphs compares two runs' JSON:

    python tools/export_fingerprint.py > before.json   # on the old tree
    python tools/export_fingerprint.py > after.json    # on the new tree
    python tools/export_fingerprint.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "jamba",
               "zamba2")
QUANTIZE = ("none", "int4")


def _strip(graph) -> None:
    """Drop doc strings and per-node metadata (stack traces, source paths) here and in subgraphs."""
    import onnx

    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
        for attr in node.attribute:
            for g in ((attr.g,) if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                _strip(g)
    for v in (*graph.input, *graph.output, *graph.value_info):
        del v.metadata_props[:]


def fingerprint(model_file: Path) -> dict:
    import onnx

    raw = model_file.read_bytes()
    model = onnx.load_from_string(raw)
    del model.metadata_props[:]
    model.doc_string = ""
    model.producer_version = ""
    _strip(model.graph)
    for f in model.functions:
        f.doc_string = ""
        for node in f.node:
            node.doc_string = ""
            del node.metadata_props[:]
    stripped = model.SerializeToString(deterministic=True)
    return {"sha256": hashlib.sha256(raw).hexdigest(), "stripped_sha256": hashlib.sha256(stripped).hexdigest(),
            "bytes": len(raw), "nodes": len(model.graph.node)}


def describe_digest(export_dir: Path) -> str:
    """sha256 of scan_export.json without its file hashes (model.onnx's hash moves with the stack traces)."""
    d = json.loads((export_dir / "scan_export.json").read_text())
    d.pop("sha256", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def run(model_types) -> dict:
    from scan_export.onnx.model_export import export_model
    from scan_export.tiny import make_tiny_checkpoint

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mt in model_types:
            ckpt = make_tiny_checkpoint(Path(tmp) / f"ckpt-{mt}", mt, seed=0)
            for q in QUANTIZE:
                d = Path(tmp) / f"out-{mt}-{q}"
                export_model(ckpt, d, quantize=q)
                out[f"{mt}/{q}"] = {**fingerprint(d / "model.onnx"), "description_sha256": describe_digest(d)}
                print(f"{mt}/{q}: {out[f'{mt}/{q}']['stripped_sha256'][:16]}", file=sys.stderr)
    return out


def compare(a: dict, b: dict) -> int:
    bad = 0
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x is None or y is None:
            print(f"{k}: only in {'second' if x is None else 'first'}")
            bad += 1
        elif x["stripped_sha256"] != y["stripped_sha256"]:
            print(f"{k}: DIFFERENT graphs ({x['nodes']} vs {y['nodes']} nodes)")
            bad += 1
        elif "description_sha256" in x and "description_sha256" in y and x["description_sha256"] != y["description_sha256"]:
            print(f"{k}: identical graph, DIFFERENT scan_export.json")
            bad += 1
        else:
            print(f"{k}: identical graph (and scan_export.json where both runs hashed it); model.onnx bytes {'identical' if x['sha256'] == y['sha256'] else 'differ in stack-trace metadata only'}")
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    p.add_argument("--model-types", default=",".join(MODEL_TYPES))
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*(json.loads(Path(f).read_text()) for f in args.compare)))
    json.dump(run(args.model_types.split(",")), sys.stdout, indent=1)
    print()
