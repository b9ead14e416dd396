"""genai_config.json: what onnxruntime-genai (>= 0.18) needs to run an export as it is (`--target genai`).

genai's generic decoder runs our graph through its recurrent-state support: it finds the layers
by matching graph input names against `past_recurrent_names`, binds the conv and recurrent state of
each layer by the four name templates, and allocates each state from the declared input shape with
only the batch dim dynamic (every other state dim is a number in our graphs). It feeds input_ids
and, of the rest, only inputs it knows (num_logits_to_keep, attention_mask, position_ids; only the
hybrids' attention_mask is ours), so the genai target gives logits_to_keep a default of 0: all
positions, the (batch, seqlen, vocab) logits genai binds before each run.

Hybrids: genai finds attention layers by the KV name templates and recurrent layers by the state
templates, layer by layer, so layers of either kind (or both, as Falcon-H1's) at any indices bind;
it grows the KV caches itself (past_present_share_buffer false: present is past + this call).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ScanExportError
from ..runtime.genai import GENAI_CONFIG_FILE  # noqa: F401 (the file's name lives with its reader)
# A recurrent model has no positional limit, but genai requires one and makes it the default
# max_length (it allocates batch x max_length int32 token ids: 4 MiB per row here).
CONTEXT_LENGTH = 1 << 20
# generation_config.json keys genai's `search` section takes with the same meaning. num_beams is
# left out on purpose: genai does not reorder recurrent state between beams.
SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "min_length", "max_length")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ScanExportError(f"{path} is not valid JSON: {e}") from None


# Our graphs' state names (contract: scan_export.json's state entries), as genai's %d templates.
RECURRENT_NAMES = {"conv_state": ("past_conv_names", "present_conv_names", "past.%d.conv_state", "present.%d.conv_state"),
                   "ssm_state": ("past_recurrent_names", "present_recurrent_names", "past.%d.ssm_state",
                                 "present.%d.ssm_state")}
KV_NAMES = {"key": ("past_key_names", "present_key_names", "past_key_values.%d.key", "present.%d.key"),
            "value": ("past_value_names", "present_value_names", "past_key_values.%d.value", "present.%d.value")}


def _io_names(description: dict) -> tuple[dict, dict]:
    """genai's decoder inputs/outputs for the state tensors the description lists, each name checked
    against its template: genai binds by template, so a name that does not fit would be left unfed."""
    inputs, outputs = {}, {}
    for entry in description.get("state", []):
        for tensor, (past_key, present_key, past, present) in {**RECURRENT_NAMES, **KV_NAMES}.items():
            if tensor not in entry:
                continue
            names = entry[tensor]["input"], entry[tensor]["output"]
            if names != (past % entry["layer"], present % entry["layer"]):
                raise ScanExportError(f"state of layer {entry['layer']}: expected {past % entry['layer']!r} -> "
                                      f"{present % entry['layer']!r} for onnxruntime-genai, got {names[0]!r} -> {names[1]!r}")
            inputs[past_key], outputs[present_key] = past, present
    return inputs, outputs


def genai_config(description: dict, model_file: str, checkpoint_dir) -> dict:
    """The genai_config.json for an export described by `description` (scan_export.json).

    Token ids and search defaults come from the checkpoint's generation_config.json, then its
    config.json. genai stops at eos_token_id, or at pad_token_id when there is none (its rule), and
    treats trailing pad tokens of a prompt as padding when it picks the prompt's last logits."""
    checkpoint_dir = Path(checkpoint_dir)
    generation = _read_json(checkpoint_dir / "generation_config.json")
    config = _read_json(checkpoint_dir / "config.json")

    def token(name):
        value = generation.get(name, config.get(name))
        return value if value is None or isinstance(value, list) else int(value)

    eos = token("eos_token_id")
    eos = [] if eos is None else [int(t) for t in eos] if isinstance(eos, list) else [eos]
    pad = token("pad_token_id")
    pad = pad[0] if isinstance(pad, list) else pad
    bos = token("bos_token_id")
    bos = bos[0] if isinstance(bos, list) else bos
    state_inputs, state_outputs = _io_names(description)
    model = {
        "type": "decoder",
        "context_length": CONTEXT_LENGTH,
        "vocab_size": description["vocab_size"],
        # genai needs a pad id; with none given, eos is the usual stand-in (as in transformers).
        "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
        "decoder": {
            "filename": model_file,
            "num_hidden_layers": description["num_layers"],
            "hidden_size": description["hidden_size"],
            "session_options": {"provider_options": []},
            "inputs": {"input_ids": "input_ids", **state_inputs},
            "outputs": {"logits": "logits", **state_outputs},
        },
    }
    if any(i["name"] == "attention_mask" for i in description.get("inputs", [])):
        model["decoder"]["inputs"]["attention_mask"] = "attention_mask"
    if "past_key_names" in state_inputs:
        attention = description["attention"]
        model["decoder"].update(num_attention_heads=attention["num_heads"], num_key_value_heads=attention["num_kv_heads"],
                                head_size=attention["head_dim"])
    kinds = description.get("layer_kinds") or []
    if "shortconv" in kinds:
        # genai's generic decoder finds recurrent layers by past_recurrent_names (ssm_state), which a
        # short conv lacks; its "lfm2" type binds conv-only layers by past_conv_names and takes each
        # layer's kind (its names) and the conv cache length. It allocates the state from our graph's
        # declared shape and reads it nowhere, so our (K−1, hidden) layout serves.
        model["type"] = "lfm2"
        model["decoder"]["layer_types"] = ["conv" if k == "shortconv" else "full_attention" for k in kinds]
        model["decoder"]["conv_cache_size"] = description["conv_kernel"] - 1
    if eos:
        model["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if bos is not None:
        model["bos_token_id"] = bos
    search = {k: generation[k] for k in SEARCH_KEYS if generation.get(k) is not None}
    search.update({
        "num_beams": 1,
        # Separate past and present state buffers, swapped after each run: our graph was never
        # written to have its state outputs alias its state inputs.
        "past_present_share_buffer": False,
    })
    return {"model": model, "search": search}
