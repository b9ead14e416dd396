"""File names, input names, the format string and its versions: what every export and every host agrees on."""

FORMAT = "scan_export/mamba-lm"
DESCRIPTION_FILE = "scan_export.json"
MODEL_FILE = "model.onnx"
LOGITS_TO_KEEP = "logits_to_keep"
ATTENTION_MASK = "attention_mask"  # hybrid exports (version 4): (batch, past_seqlen + seqlen) int64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")
# Every name an export before the `files` manifest (format version 3) could have written.
LEGACY_FILES = [MODEL_FILE, MODEL_FILE + ".data", DESCRIPTION_FILE, *TOKENIZER_FILES]

# scan_export.json's version, for every model type.
# 1: first. 2: the Mamba-1 ssm_state became channels-last, (batch, n, d_inner), and the input
# logits_to_keep appeared; state inputs are the ones `state` names. 3: `files` lists every file the
# export wrote (a later export into the same directory removes exactly those). 4: hybrid models:
# KV caches and attention_mask; every state tensor says how it starts ("init") and each `state`
# entry its layer's "kind". Still 4: `sha256` ({file: hash} of every file but scan_export.json,
# onnx/output_dir.py) is one more key, which readers of version 4 ignore.
FORMAT_VERSION = 4
SUPPORTED_VERSIONS = (1, 2, 3, 4)
STATE_DTYPES = ("float32", "float16")
# The named (dynamic) dims a description uses; generate gives each its meaning (zero_state, prefill).
DIM_NAMES = ("batch", "seqlen", "logits_len", "past_seqlen", "total_seqlen")
