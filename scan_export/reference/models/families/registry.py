"""The Family record and the table families register into. It imports no family file: the family
files import it, and families/__init__.py imports them (so there is no import cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ....errors import ScanExportError
from ..hf_cache import cache_states

# which scan a family's Mamba layers export: the selective scan (Mamba-1: one lowering, --scan-form
# chooses sequential or chunked) or SSD (Mamba-2: always chunked, --lowering chooses portable or native)
SELECTIVE_SCAN, SSD = "selective_scan", "ssd"
# a family without a Mamba scan (LFM2's short convolutions): neither --lowering nor --scan-form applies
NO_SCAN = "none"
# the Gated DeltaNet's delta rule (Qwen3.5, Qwen3-Next): one lowering, a Scan over time (gated_delta_export)
GATED_DELTA = "gated_delta"

# the tiny checkpoints' sharpened parameters (tiny.make_tiny_checkpoint), by name suffix: every matrix of
# a hybrid (projections, MLPs, experts, router, embeddings), never the norms, conv or scan parameters
HYBRID_SHARPENED = ("in_proj.weight", "out_proj.weight", "embed_tokens.weight", "_proj.weight", "lm_head.weight",
                    "linear.weight", "router.weight", "gate_up_proj", "down_proj")

# the Mamba-2 hybrids' tiny shape, which their tiny checkpoints start from: 4 layers, attention at
# layer 1 between Mamba-2 layers, GQA 4:2
TINY_HYBRID = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                   mamba_chunk_size=16, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    """One model_type: everything the package knows about it outside its layer classes."""

    model_type: str
    hf_class: str  # transformers' causal-LM class (verify's referee, bench)
    config_class: str  # transformers' config class (tiny checkpoints)
    schema: dict  # config.json fields checked before anything is built (config.check_schema)
    config_from_hf: Callable  # config.json's dict -> our config
    build: Callable  # config.json's dict -> the (unloaded) model
    scan: str  # SELECTIVE_SCAN, SSD, GATED_DELTA or NO_SCAN
    tiny: dict  # the tiny checkpoint's config (tiny.make_tiny_checkpoint with defaults)
    hybrid: bool = True  # a HybridLM (attention_mask and cache_layout I/O); False: a MambaLM
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint name -> our name, substring replacements
    # {our stacked name: rows of checkpoint names} from the checkpoint's names, for checkpoints that
    # store each expert apart (loading.stacked_tensors); None: nothing is stacked
    stacked: Callable | None = None
    moe: bool = False  # has routed experts (verify runs transformers' experts eager)
    tiny_base: dict = field(default_factory=dict)  # config under the tiny one, kept with defaults=False too
    sharpened: tuple[str, ...] = HYBRID_SHARPENED  # parameter name suffixes the tiny checkpoint sharpens
    sharpen_factors: tuple[tuple[str, float], ...] = ()  # (name part, factor), first match wins
    sharpen_gains: dict = field(default_factory=dict)  # {name suffix: extra gain}
    bench_configs: dict = field(default_factory=dict)  # {bench --configs name: config}; bench.py's shapes
    hf_states: Callable = cache_states  # transformers' cache -> our state list (verify)
    # config.json's dict -> its layer count, when num_hidden_layers is not it (verify's check)
    num_layers: Callable | None = None

    def layer_count(self, raw: dict):
        return self.num_layers(raw) if self.num_layers is not None else raw.get("num_hidden_layers")


_REGISTERED: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (once per model_type); returns it, so that a family file can keep a name for it."""
    old = _REGISTERED.get(family.model_type)
    if old is not None and old is not family:
        raise ScanExportError(f"model_type {family.model_type!r}: expected one family, got a second "
                              f"({family.build.__module__} after {old.build.__module__})")
    _REGISTERED[family.model_type] = family
    return family


def unregister(model_type: str) -> None:
    _REGISTERED.pop(model_type, None)




def registered() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_REGISTERED.values())
