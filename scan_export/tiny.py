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
# Hybrids: 4 layers, attention at layer 1 (one attention layer between Mamba-2 layers), GQA 4:2.
TINY_HYBRID = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                   mamba_chunk_size=16, tie_word_embeddings=False)
TINY_BAMBA = dict(TINY_HYBRID, intermediate_size=96, attn_layer_indices=[1])
TINY_GRANITE = dict(TINY_HYBRID, intermediate_size=32, shared_intermediate_size=48, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=["mamba", "attention", "mamba", "mamba"],
                    position_embedding_type="rope", embedding_multiplier=12.0, logits_scaling=4.0,
                    residual_multiplier=0.5, attention_multiplier=0.125)
# Shaped like ibm-granite/granite-4.0-h-micro's blocks at 130m scale (random weights, for benchmarks only):
# 24 layers with attention every 6th, 24 Mamba-2 heads of 64, d_state 128; MoE with 8 experts, top 2.
GRANITE_130M = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, num_attention_heads=12,
                    num_key_value_heads=4, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
                    mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, intermediate_size=512,
                    shared_intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2,
                    layer_types=["attention" if i % 6 == 5 else "mamba" for i in range(24)],
                    position_embedding_type=None, tie_word_embeddings=True)
# The MoE bench: GRANITE_130M's layers, 6 of them, with 8 and with 32 experts at the same top-2 (the
# 24-layer model with 32 experts, 0.9 G parameters, runs the exporter out of 23 GB of memory).
GRANITE_MOE_8E = dict(GRANITE_130M, num_hidden_layers=6, layer_types=["mamba"] * 5 + ["attention"])
GRANITE_MOE_32E = dict(GRANITE_MOE_8E, num_local_experts=32)
# Falcon-H1: every layer runs Mamba-2 and attention in parallel. mamba_d_ssm set (its default is 1024),
# head_dim set apart from hidden / heads (real checkpoints do), and every µP multiplier ≠ 1.
TINY_FALCON_H1 = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, mamba_d_ssm=96, mamba_n_heads=8,
                      mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=True,
                      tie_word_embeddings=False, embedding_multiplier=5.0, lm_head_multiplier=0.5,
                      mlp_multipliers=[0.5, 2.0], key_multiplier=0.7, attention_in_multiplier=1.5,
                      attention_out_multiplier=0.8, ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 0.9],
                      ssm_in_multiplier=1.2, ssm_out_multiplier=0.6)
# Nemotron-H: Mamba-2 / attention (NoPE, GQA 4:2) / ReLU² MLP / MoE (8 experts in 2 groups, top 2 within
# the best group, shared experts), one mixer per layer.
TINY_NEMOTRON_H = dict(vocab_size=256, hidden_size=64, layers_block_type=["linear_attention", "full_attention", "mlp", "moe"],
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                       mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
                       chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                       moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5,
                       tie_word_embeddings=False)
# Jamba (hybrids.md 4.9): Mamba-1 layers 0, 2 and attention layers 1, 3 (period 2, offset 1), MoE with
# 4 experts top-2 in layers 1, 3 (period 2, offset 1), dense SwiGLU MLPs in 0, 2; GQA 4:2, no RoPE.
TINY_JAMBA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8,
                  mamba_d_conv=4, mamba_expand=2, tie_word_embeddings=False)
# Zamba2: 3 hybrid layers over 2 shared blocks (layers 1 and 4 share block 0: the tying and the per-layer
# adapters both matter), attention adapters (kv = heads), RoPE. Tied embeddings: transformers ties the
# shared blocks only then (untied, every hybrid layer has its own copy; reference/models/zamba2.py).
TINY_ZAMBA2 = dict(vocab_size=256, hidden_size=64, num_hidden_layers=5,
                   layers_block_type=["linear_attention", "hybrid", "hybrid", "linear_attention", "hybrid"],
                   mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=8, mamba_ngroups=1, chunk_size=16,
                   num_attention_heads=4, intermediate_size=96, num_mem_blocks=2, use_shared_attention_adapter=True,
                   adapter_rank=8, use_mem_rope=True, tie_word_embeddings=True)
# Per family, (name part, factor) on the sharpened scale, first match wins. Zamba2's shared attention
# (scores × (head_dim/2)**-0.5 over q, k plus their adapters) turns peaky at the full scale: transformers'
# own float32 logits then sit 1.7e-4 off its float64 ones on TINY_ZAMBA2; with these, 3e-6.
SHARPEN_FACTORS = {"zamba2": (("adapter_list", 0.3), ("q_proj", 0.5), ("k_proj", 0.5), ("gate_up_proj", 0.7))}
HYBRID_DEFAULTS = {"bamba": TINY_BAMBA, "granitemoehybrid": TINY_GRANITE, "nemotron_h": TINY_NEMOTRON_H,
                   "falcon_h1": TINY_FALCON_H1, "jamba": TINY_JAMBA,
                   "zamba2": TINY_ZAMBA2}
# Extra gain on top of sharpen's, by parameter suffix: a Mamba-1 mixer's output (D·u gated by silu(z))
# is a few times weaker than an MLP's at the same init, and a late Mamba layer would barely move the tokens.
SHARPEN_GAINS = {"jamba": {"mamba.out_proj.weight": 3.0}}


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
    classes = {
        "mamba": (tf.MambaConfig, tf.MambaForCausalLM),
        "falcon_mamba": (tf.FalconMambaConfig, tf.FalconMambaForCausalLM),
        "mamba2": (tf.Mamba2Config, tf.Mamba2ForCausalLM),
        "bamba": (tf.BambaConfig, tf.BambaForCausalLM),
        "granitemoehybrid": (tf.GraniteMoeHybridConfig, tf.GraniteMoeHybridForCausalLM),
        "falcon_h1": (tf.FalconH1Config, tf.FalconH1ForCausalLM),
        "nemotron_h": (tf.NemotronHConfig, tf.NemotronHForCausalLM),
        "jamba": (tf.JambaConfig, tf.JambaForCausalLM),
        "zamba2": (tf.Zamba2Config, tf.Zamba2ForCausalLM),
    }
    if model_type not in classes:
        raise ScanExportError(f"model_type must be one of {sorted(classes)}, got {model_type!r}")
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
    hybrid = model_type in HYBRID_DEFAULTS
    params = {**((HYBRID_DEFAULTS[model_type] if hybrid else TINY) if defaults else {}), **overrides}
    if model_type == "mamba2":  # hidden_size · expand == num_heads · head_dim
        params = {"num_heads": 8, "head_dim": 16, "n_groups": 1, "chunk_size": 16, **params}
    if not hybrid:
        params = {"tie_word_embeddings": True, **params}
    config = config_cls(**params, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = model_cls(config).eval()
    if sharpen:
        # Hybrids: every matrix (projections, MLPs, experts, router, embeddings), so that every
        # layer, expert and head moves the tokens; never the norms, conv or scan parameters. Zamba2's
        # adapters too (their down/up pairs end in .0.weight / .1.weight); a shared block's weights are
        # one parameter in transformers, listed (and scaled) once.
        suffixes = (("in_proj.weight", "out_proj.weight", "embed_tokens.weight", "_proj.weight", "lm_head.weight",
                     "linear.weight", "router.weight", "gate_up_proj", "down_proj") if hybrid else
                    ("in_proj.weight", "x_proj.weight", "out_proj.weight", "embeddings.weight"))
        if model_type == "nemotron_h":  # its embeddings, stacked experts (up_proj, no gate) and router
            suffixes += ("embeddings.weight", "experts.up_proj", "gate.weight")
        gen = torch.Generator().manual_seed(seed + 1)
        gains = SHARPEN_GAINS.get(model_type, {})
        with torch.no_grad():
            for name, p in model.named_parameters():
                if (name.endswith(suffixes) or "adapter_list" in name) and "conv1d" not in name:
                    gain = next((g for k, g in gains.items() if name.endswith(k)), 1.0)
                    gain *= next((f for part, f in SHARPEN_FACTORS.get(model_type, ()) if part in name), 1.0)
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
