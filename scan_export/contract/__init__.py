"""The export directory's I/O contract as data (docs/deploy.md is the host's side of it).

A leaf: it imports nothing from scan_export but errors, and no torch, so onnx/ (which writes
scan_export.json), runtime/ (which reads it) and the Node/web hosts' tests all take the same names.

  names.py     file names, input names, format and versions
  kinds.py     the layer kinds (one vocabulary: scan_export.json's names) and the cache tensors each carries
  describe.py  scan_export.json for an export (describe), the graph's cache I/O names (cache_names)
  read.py      reading scan_export.json safely, and checking a loaded graph against it
"""

from .describe import cache_names, describe, describe_hybrid
from .kinds import (ATTENTION, FFN, KIND_PARTS, KV_MEANING, LAYER_KINDS, MAMBA1, MAMBA2, PARALLEL, SHORTCONV,
                    CacheTensor, attention_cache, io_names, mamba_cache, shortconv_cache, state_entry)
from .names import (ATTENTION_MASK, DESCRIPTION_FILE, DIM_NAMES, FORMAT, FORMAT_VERSION, LEGACY_FILES, LOGITS_TO_KEEP,
                    MODEL_FILE, STATE_DTYPES, SUPPORTED_VERSIONS, TOKENIZER_FILES)
from .read import ORT_TYPES, check_graph_matches, graph_mismatch, plain_name, read_description

__all__ = ["cache_names", "describe", "describe_hybrid", "ATTENTION", "FFN", "KIND_PARTS", "KV_MEANING", "LAYER_KINDS", "MAMBA1", "MAMBA2",
           "PARALLEL", "SHORTCONV", "CacheTensor", "attention_cache", "io_names", "mamba_cache", "shortconv_cache", "state_entry", "ATTENTION_MASK",
           "DESCRIPTION_FILE", "DIM_NAMES", "FORMAT", "FORMAT_VERSION", "LEGACY_FILES", "LOGITS_TO_KEEP", "MODEL_FILE",
           "STATE_DTYPES", "SUPPORTED_VERSIONS", "TOKENIZER_FILES", "ORT_TYPES", "check_graph_matches",
           "graph_mismatch", "plain_name", "read_description"]
