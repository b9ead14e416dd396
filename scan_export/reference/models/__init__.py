"""HF-named language models with their recurrent state and KV cache as explicit inputs and outputs.

One file per piece: config.py (configs read from config.json), norms.py, mamba_mixers.py (Mamba-1,
Mamba-2), attention.py (GQA + RoPE + KV cache), mlp.py, moe.py, hybrid.py (the hybrid stack),
hf_fields.py (config.json readers families share), residual_layer.py (the pre-norm layer Bamba and Jamba
share), families/ (one file per family, each declaring its
families.Family; families/__init__.py is the registry everything else reads) and loading.py (checkpoints).
"""

from .config import (ATTENTION, FFN, MAMBA2, MAMBA1, PARALLEL, AttentionDims, HybridConfig, Mamba2Dims,
                     MambaLMConfig, RopeSpec, _json_float)
from .hybrid import HybridLM
from .loading import (all_model_types, checked_config, hybrid_families, load_hf_state_dict, load_hybrid_lm, load_mamba_lm,
                      load_model, read_hf_config, read_mamba_config, checkpoint_names, model_blueprint)
from .families import families as _families  # not `families`: that name is the subpackage
from .families.mamba import Backbone, MambaBlock, MambaLM
from .mamba_mixers import Mamba2Mixer, MambaMixer
from .norms import GatedRMSNorm, RMSNorm, _rms_normalize, weightless_rms

# the registry's built-in families, as the tuples this package has always exported
SUPPORTED_MODEL_TYPES = tuple(f.model_type for f in _families() if not f.hybrid)
HYBRID_MODEL_TYPES = tuple(f.model_type for f in _families() if f.hybrid)

__all__ = ["ATTENTION", "FFN", "MAMBA2", "MAMBA1", "PARALLEL", "SUPPORTED_MODEL_TYPES", "HYBRID_MODEL_TYPES", "AttentionDims", "HybridConfig",
           "Mamba2Dims", "MambaLMConfig", "RopeSpec", "_json_float", "HybridLM", "all_model_types", "checked_config", "hybrid_families",
           "load_hf_state_dict", "load_hybrid_lm", "read_mamba_config", "checkpoint_names", "model_blueprint", "load_mamba_lm", "load_model", "read_hf_config", "Backbone",
           "MambaBlock", "MambaLM", "Mamba2Mixer", "MambaMixer", "GatedRMSNorm", "RMSNorm", "_rms_normalize",
           "weightless_rms"]
