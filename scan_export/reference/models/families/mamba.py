"""Mamba / FalconMamba / Mamba-2 language models with the recurrent state as explicit inputs and outputs.

These are the modules that get exported. Parameter names match Hugging Face checkpoints
(`backbone.layers.{i}.mixer.in_proj.weight`, ...), so weights load by name with no conversion.
Per layer i the state is conv_state_i and ssm_state_i (mamba_mixers.py): channels-last, the layout
the exported scan works in, so a decode step spends no transposes on them (transformers keeps
(b, d, K) and (b, d, n); verify maps between the two).
"""

from __future__ import annotations

import torch
from torch import nn

from ....errors import ScanExportError
from .registry import SELECTIVE_SCAN, SSD, Family, register
from ..config import MAMBA_SCHEMA, MambaLMConfig
from ..mamba_mixers import Mamba2Mixer, MambaMixer
from ..norms import RMSNorm


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaLMConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(cfg) if cfg.model_type == "mamba2" else MambaMixer(cfg)

    def forward(self, x, conv_state, ssm_state):
        y, conv_state, ssm_state = self.mixer(self.norm(x), conv_state, ssm_state)
        return x + y, conv_state, ssm_state


class Backbone(nn.Module):
    def __init__(self, cfg: MambaLMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class MambaLM(nn.Module):
    """forward(input_ids: (b, l), conv_0, ssm_0, conv_1, ssm_1, ...) -> (logits: (b, l, V), conv_0', ssm_0', ...)"""

    def __init__(self, cfg: MambaLMConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, *states):
        n_layers = self.cfg.num_hidden_layers
        if len(states) != 2 * n_layers:
            raise ScanExportError(f"expected {2 * n_layers} state tensors (conv, ssm per layer), got {len(states)}")
        x = self.backbone.embeddings(input_ids)
        new_states = []
        for i, layer in enumerate(self.backbone.layers):
            x, conv_state, ssm_state = layer(x, states[2 * i], states[2 * i + 1])
            new_states += [conv_state, ssm_state]
        return (self.lm_head(self.backbone.norm_f(x)), *new_states)

    def zero_state(self, batch: int, dtype=None) -> list[torch.Tensor]:
        cfg = self.cfg
        dtype = dtype or self.lm_head.weight.dtype
        conv, ssm = cfg.state_shapes()
        out = []
        for _ in range(cfg.num_hidden_layers):
            out.append(torch.zeros(batch, *conv, dtype=dtype))
            out.append(torch.zeros(batch, *ssm, dtype=torch.float32))
        return out


def config_from_hf(raw: dict) -> MambaLMConfig:
    cfg = MambaLMConfig.from_hf(raw)
    cfg.check()
    return cfg


def build(raw: dict) -> MambaLM:
    return MambaLM(config_from_hf(raw))


# the tiny checkpoints' config (tiny.make_tiny_checkpoint); tied embeddings unless told otherwise
TINY = dict(vocab_size=256, hidden_size=64, state_size=16, num_hidden_layers=2, conv_kernel=4, expand=2)
# Shaped like state-spaces/mamba-130m-hf, with random weights (for benchmarks only).
MAMBA_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, conv_kernel=4, expand=2)
# Shaped like state-spaces/mamba2-130m: 24 heads of 64, d_state 128, one group.
MAMBA2_130M = dict(vocab_size=50280, hidden_size=768, state_size=128, num_hidden_layers=24, conv_kernel=4, expand=2,
                   num_heads=24, head_dim=64, n_groups=1, chunk_size=256)
TIED = {"tie_word_embeddings": True}
# the mixers' projections and the embeddings; never the norms, conv or scan parameters
SHARPENED = ("in_proj.weight", "x_proj.weight", "out_proj.weight", "embeddings.weight")

FAMILIES = (
    register(Family(model_type="mamba", hf_class="MambaForCausalLM", config_class="MambaConfig", schema=MAMBA_SCHEMA,
                    config_from_hf=config_from_hf, build=build, scan=SELECTIVE_SCAN, tiny=TINY, hybrid=False,
                    tiny_base=TIED, sharpened=SHARPENED, bench_configs={"tiny": TINY, "130m": MAMBA_130M})),
    register(Family(model_type="falcon_mamba", hf_class="FalconMambaForCausalLM", config_class="FalconMambaConfig",
                    schema=MAMBA_SCHEMA, config_from_hf=config_from_hf, build=build, scan=SELECTIVE_SCAN, tiny=TINY,
                    hybrid=False, tiny_base=TIED, sharpened=SHARPENED)),
    register(Family(model_type="mamba2", hf_class="Mamba2ForCausalLM", config_class="Mamba2Config", schema=MAMBA_SCHEMA,
                    config_from_hf=config_from_hf, build=build, scan=SSD, tiny=TINY, hybrid=False,
                    # hidden_size · expand == num_heads · head_dim, whatever the overrides leave out
                    tiny_base={**TIED, "num_heads": 8, "head_dim": 16, "n_groups": 1, "chunk_size": 16},
                    sharpened=SHARPENED, bench_configs={"tiny": TINY, "130m": MAMBA2_130M})),
)
