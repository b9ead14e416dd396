"""Tiny random Hugging Face checkpoints, written with save_pretrained: the built-in default model
for `scan-export demo`, and the fixtures the tests export. Needs transformers (an extra)."""

from __future__ import annotations

from pathlib import Path

from .errors import ScanExportError
from .reference.models.families import bamba, falcon_h1, families, granitemoehybrid, jamba, mamba, nemotron_h, zamba2
from .reference.models.families import get as family_of

# Each family's tiny config, sharpening and transformers classes are its declaration's (reference/models/
# families/); HYBRID_DEFAULTS is the hybrids' tiny configs by model_type, a dict tests may patch.
HYBRID_DEFAULTS = {f.model_type: f.tiny for f in families() if f.hybrid}
# bench.py reads these by name
TINY, MAMBA_130M, MAMBA2_130M = mamba.TINY, mamba.MAMBA_130M, mamba.MAMBA2_130M
TINY_BAMBA, TINY_FALCON_H1, TINY_JAMBA = bamba.TINY_BAMBA, falcon_h1.TINY_FALCON_H1, jamba.TINY_JAMBA
TINY_NEMOTRON_H, TINY_ZAMBA2 = nemotron_h.TINY_NEMOTRON_H, zamba2.TINY_ZAMBA2
TINY_GRANITE, GRANITE_130M = granitemoehybrid.TINY_GRANITE, granitemoehybrid.GRANITE_130M
GRANITE_MOE_8E, GRANITE_MOE_32E = granitemoehybrid.GRANITE_MOE_8E, granitemoehybrid.GRANITE_MOE_32E


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError('tiny checkpoints need transformers: pip install "scan-export[test]"') from e
    return transformers


def make_tiny_checkpoint(path, model_type: str = "mamba", seed: int = 0, sharpen: bool = True, defaults: bool = True,
                         **overrides) -> Path:
    """Save a random Mamba / FalconMamba / Mamba2 / Bamba / GraniteMoeHybrid / NemotronH / FalconH1 / Jamba / Zamba2 model to path and return path.

    sharpen: HF's init gives near-uniform logits, so greedy decoding of a random model repeats one
    token and proves little. Larger projection weights give varied, well-separated tokens.
    defaults: start from this module's tiny config for the type; False gives transformers' own
    defaults plus overrides alone (a config copied from elsewhere, such as transformers' testers).
    """
    import torch

    tf = _transformers()
    family = family_of(model_type)
    if family is None:
        raise ScanExportError(f"model_type must be one of {sorted(f.model_type for f in families())}, got {model_type!r}")
    config_cls, model_cls = getattr(tf, family.config_class), getattr(tf, family.hf_class)
    torch.manual_seed(seed)
    tiny = HYBRID_DEFAULTS.get(model_type, family.tiny)  # a family registered after this import: its own
    params = {**family.tiny_base, **(tiny if defaults else {}), **overrides}
    config = config_cls(**params, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = model_cls(config).eval()
    if sharpen:
        # every matrix the family names (family.sharpened), so that every layer, expert and head moves
        # the tokens; Zamba2's adapters too (their down/up pairs end in .0.weight / .1.weight); a shared
        # block's weights are one parameter in transformers, listed (and scaled) once.
        suffixes = family.sharpened
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if (name.endswith(suffixes) or "adapter_list" in name) and "conv1d" not in name:
                    gain = next((g for k, g in family.sharpen_gains.items() if name.endswith(k)), 1.0)
                    gain *= next((f for part, f in family.sharpen_factors if part in name), 1.0)
                    p.copy_(torch.randn(p.shape, generator=gen) * (gain * 1.5 / p.shape[-1] ** 0.5))
            for name, b in model.named_buffers():
                # Nemotron-H's router bias starts at zero; nonzero, it changes which experts are chosen
                # (and not their weights), which the export must reproduce.
                if name.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
    path = Path(path)
    tf.utils.logging.disable_progress_bar()  # "Writing model shards" for a 1-shard toy is noise
    try:
        model.save_pretrained(path)
    finally:
        tf.utils.logging.enable_progress_bar()
    return path
