"""genai_config.json: what onnxruntime-genai (>= 0.18) needs to run an export as it is (`--target genai`).

genai's generic decoder runs our graph through its recurrent-state support: it finds the layers
by matching graph input names against `past_recurrent_names`, binds the conv and recurrent state of
each layer by the four name templates, and allocates each state from the declared input shape with
only the batch dim dynamic (every other state dim is a number in our graphs). It feeds input_ids
and, of the rest, only inputs it knows (num_logits_to_keep, attention_mask, position_ids, none of
which our graph has), so the genai target gives logits_to_keep a default of 0: all positions, the
(batch, seqlen, vocab) logits genai binds before each run.
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
            "inputs": {"input_ids": "input_ids", "past_conv_names": "past.%d.conv_state",
                       "past_recurrent_names": "past.%d.ssm_state"},
            "outputs": {"logits": "logits", "present_conv_names": "present.%d.conv_state",
                        "present_recurrent_names": "present.%d.ssm_state"},
        },
    }
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
