"""Generation through onnxruntime-genai (>= 0.18) instead of our loop: `scan-export generate --engine genai`.

For comparison with runtime.generate on exports made with `--target genai` (they carry
genai_config.json). genai runs the graph through its recurrent-state support: it feeds input_ids,
carries past/present state itself, and picks each row's last logits.

Limitation (measured): genai pads a batch of different prompt lengths on the right with
pad_token_id, and those pad tokens enter the recurrent state (our graph has no attention mask),
so the shorter prompts continue wrongly from their second token on. Batches here must therefore
be of equal-length prompts; runtime.generate prefills ragged batches correctly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ScanExportError
from ..contract import read_description
from .generate import DESCRIPTION_FILE, FORMAT, Sampling  # noqa: F401 (re-exported)

GENAI_CONFIG_FILE = "genai_config.json"
PROVIDERS = ("cpu", "cuda")


def import_genai():
    """onnxruntime_genai, imported only when asked for (it is an optional extra)."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise ScanExportError('--engine genai needs onnxruntime-genai >= 0.18 (with onnxruntime >= 1.31): '
                              'pip install "onnxruntime-genai>=0.18", or use --engine ort') from None
    return onnxruntime_genai


class GenaiModel:
    """An export directory loaded by onnxruntime-genai on one provider."""

    def __init__(self, export_dir, provider: str = "cpu"):
        export_dir = Path(export_dir)
        self.description = read_description(export_dir)  # checked field by field, one line naming the field
        config_path = export_dir / GENAI_CONFIG_FILE
        if not config_path.is_file():
            raise ScanExportError(f"export_dir {str(export_dir)!r} has no {GENAI_CONFIG_FILE} (target "
                                  f"{self.description.get('target')!r}); export it with --target genai for --engine genai")
        if provider not in PROVIDERS:
            raise ScanExportError(f"provider must be one of {list(PROVIDERS)}, got {provider!r}")
        og = import_genai()
        config = og.Config(str(export_dir))
        config.clear_providers()
        if provider == "cuda":
            config.append_provider("cuda")
        self.export_dir = export_dir
        self.vocab_size = int(self.description["vocab_size"])
        self.model = og.Model(config)
        genai = json.loads(config_path.read_text())["model"]
        # genai ends a row at eos_token_id, or at pad_token_id when there is none, and emits pad
        # tokens for that row afterwards: such a row is done here too.
        eos = genai.get("eos_token_id", genai.get("pad_token_id", 0))
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])


def generate_genai(model: GenaiModel, prompts: list[list[int]], max_new_tokens: int, *,
                   sampling: Sampling = Sampling(), stop_token_id: int | None = None,
                   on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """runtime.generate's contract, run by onnxruntime-genai: new tokens for each prompt (a stop
    token, when hit, is the last one returned); prompts must all have the same length."""
    if max_new_tokens < 0:
        raise ScanExportError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    lengths = [len(p) for p in prompts]
    if 0 in lengths:
        raise ScanExportError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    if len(set(lengths)) > 1:
        raise ScanExportError(f"prompts have lengths {lengths}: onnxruntime-genai pads shorter prompts into the "
                              f"recurrent state, so --engine genai takes prompts of one length (--engine ort takes any)")
    ids = np.array(prompts, np.int64).reshape(len(prompts), -1)
    if ids.size and (ids.min() < 0 or ids.max() >= model.vocab_size):
        bad = int(ids.max()) if ids.max() >= model.vocab_size else int(ids.min())
        raise ScanExportError(f"input ids must lie in [0, {model.vocab_size}) (vocab_size), got token id {bad}")
    out = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return out
    og = import_genai()
    options = {"max_length": lengths[0] + max_new_tokens, "batch_size": len(prompts), "do_sample": sampling.do_sample}
    if sampling.do_sample:
        # genai's top_k defaults to 50; our 0 means no top-k cut, i.e. the whole vocabulary.
        options.update(temperature=sampling.temperature, top_k=sampling.top_k or model.vocab_size, top_p=sampling.top_p)
        if sampling.seed is not None:
            options["random_seed"] = sampling.seed
    params = og.GeneratorParams(model.model)
    params.set_search_options(**options)
    generator = og.Generator(model.model, params)
    generator.append_tokens(ids.astype(np.int32))
    stops = set(model.eos_token_ids) | ({stop_token_id} if stop_token_id is not None else set())
    done = np.zeros(len(prompts), bool)
    for _ in range(max_new_tokens):
        generator.generate_next_token()
        for row, tok in enumerate(generator.get_next_tokens()):
            if not done[row]:
                out[row].append(int(tok))
                if on_token is not None:
                    on_token(row, int(tok))
                done[row] = int(tok) in stops
        if done.all() or generator.is_done():
            break
    return out
