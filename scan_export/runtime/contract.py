"""The export directory's contract (docs/deploy.md): file names, and reading scan_export.json safely.

Both sides use these names: onnx/model_export.py writes them, runtime/generate.py and the Node/web
hosts read them. A description that is not what we write is refused with one line naming the file
and the field, never a KeyError deep inside generation.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ScanExportError, describe_value, read_json_object

FORMAT = "scan_export/mamba-lm"
DESCRIPTION_FILE = "scan_export.json"
MODEL_FILE = "model.onnx"
LOGITS_TO_KEEP = "logits_to_keep"
ATTENTION_MASK = "attention_mask"  # hybrid exports (version 4): (batch, past_seqlen + seqlen) int64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")
# The families onnxruntime-genai runs (export-model --target genai refuses the hybrids).
GENAI_MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2")
# Every name an export before the `files` manifest (format version 3) could have written.
LEGACY_FILES = [MODEL_FILE, MODEL_FILE + ".data", DESCRIPTION_FILE, *TOKENIZER_FILES]
# 1: first; 2: Mamba-1 ssm_state channels-last, logits_to_keep input; 3: `files` lists what was written;
# 4: hybrid models (KV caches, attention_mask), state tensors say how they start ("init").
SUPPORTED_VERSIONS = (1, 2, 3, 4)
STATE_DTYPES = ("float32", "float16")
REQUIRED = {"model_file": str, "model_type": str, "dtype": str, "vocab_size": int, "num_layers": int,
            "inputs": list, "outputs": list, "state": list}


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
    for entry in d["inputs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("shape"), list):
            raise ScanExportError(f"{path}: each of 'inputs' expected {{name, shape, dtype}}, got {describe_value(entry)}")
        if entry["name"] != "input_ids" and entry.get("dtype") not in (*STATE_DTYPES, "int64"):
            raise ScanExportError(f"{path}: input {entry['name']!r} dtype expected one of "
                                  f"{[*STATE_DTYPES, 'int64']}, got {describe_value(entry.get('dtype'))}")
    model = export_dir / d["model_file"]
    if not model.is_file():
        raise ScanExportError(f"{model}: missing; {DESCRIPTION_FILE} names it as the model file")
    if model.stat().st_size == 0:
        raise ScanExportError(f"{model}: empty file, expected an ONNX model (re-run export-model)")
    return d
