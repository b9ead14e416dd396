"""Tiny random Hugging Face checkpoints, written with save_pretrained: the built-in default model
for `scan-export demo`, and the fixtures the tests export. Needs transformers (an extra)."""

from __future__ import annotations

from pathlib import Path

from .errors import ScanExportError

TINY = dict(vocab_size=256, hidden_size=64, state_size=16, num_hidden_layers=2, conv_kernel=4, expand=2)
# Shaped like state-spaces/mamba-130m-hf, with random weights (for benchmarks only).
MAMBA_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, conv_kernel=4, expand=2)
# Shaped like state-spaces/mamba2-130m: 24 heads of 64, d_state 128, one group.
MAMBA2_130M = dict(vocab_size=50280, hidden_size=768, state_size=128, num_hidden_layers=24, conv_kernel=4, expand=2,
                   num_heads=24, head_dim=64, n_groups=1, chunk_size=256)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError('tiny checkpoints need transformers: pip install "scan-export[test]"') from e
    return transformers


def make_tiny_checkpoint(path, model_type: str = "mamba", seed: int = 0, sharpen: bool = True, **overrides) -> Path:
    """Save a random MambaForCausalLM / FalconMambaForCausalLM to path and return path.

    sharpen: HF's init gives near-uniform logits, so greedy decoding of a random model repeats one
    token and proves little. Larger projection weights give varied, well-separated tokens.
    """
    import torch

    tf = _transformers()
    classes = {
        "mamba": (tf.MambaConfig, tf.MambaForCausalLM),
        "falcon_mamba": (tf.FalconMambaConfig, tf.FalconMambaForCausalLM),
        "mamba2": (tf.Mamba2Config, tf.Mamba2ForCausalLM),
    }
    if model_type not in classes:
        raise ScanExportError(f"model_type must be one of {sorted(classes)}, got {model_type!r}")
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
    params = {**TINY, **overrides}
    if model_type == "mamba2":  # hidden_size · expand == num_heads · head_dim
        params = {"num_heads": 8, "head_dim": 16, "n_groups": 1, "chunk_size": 16, **params}
    config = config_cls(**params, eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
    model = model_cls(config).eval()
    if sharpen:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("in_proj.weight", "x_proj.weight", "out_proj.weight", "embeddings.weight")):
                    p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / p.shape[-1] ** 0.5))
    path = Path(path)
    tf.utils.logging.disable_progress_bar()  # "Writing model shards" for a 1-shard toy is noise
    try:
        model.save_pretrained(path)
    finally:
        tf.utils.logging.enable_progress_bar()
    return path
