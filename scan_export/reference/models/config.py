"""Model configurations read from a Hugging Face config.json: the pure-Mamba families (MambaLMConfig)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ...contract.kinds import ATTENTION, FFN, KIND_PARTS, MAMBA1, MAMBA2, PARALLEL, attention_cache, mamba_cache  # noqa: F401 (re-exported)
from ...errors import ScanExportError
from .activations import read_activation

# ------------------------------------------------------------------------------------------------
# config.json field schemas: {field: (kind, low, high)}, checked in one pass (check_schema) before
# anything is built. Kinds: "int" (booleans are not integers), "bool", "num" (finite, int or float,
# low < x <= high), "rank" (an int, or "auto"), "token" (an id in [0, vocab_size), or a list of them).
# A field left out, or null, is left to the reader's default. The upper bounds are far above every
# released model (widest hidden 16k, most layers 126, largest vocab 262k) and keep a count that
# cannot finish (num_hidden_layers 10**6 built modules for ever) from starting.
MAX_WIDTH, MAX_VOCAB, MAX_LAYERS, MAX_SMALL = 1 << 17, 1 << 22, 1024, 1 << 12
COMMON_SCHEMA = {
    "vocab_size": ("int", 1, MAX_VOCAB), "hidden_size": ("int", 1, MAX_WIDTH),
    "num_hidden_layers": ("int", 1, MAX_LAYERS), "intermediate_size": ("int", 0, 1 << 20),
    "tie_word_embeddings": ("bool", None, None), "eos_token_id": ("token", None, None),
    "bos_token_id": ("token", None, None), "layer_norm_epsilon": ("num", 0, 1), "rms_norm_eps": ("num", 0, 1),
}
MAMBA_SCHEMA = {
    **COMMON_SCHEMA, "state_size": ("int", 1, MAX_SMALL), "conv_kernel": ("int", 2, 64), "expand": ("num", 0, 64),
    "time_step_rank": ("rank", 1, MAX_WIDTH), "use_bias": ("bool", None, None), "use_conv_bias": ("bool", None, None),
    "mixer_rms_eps": ("num", 0, 1), "num_heads": ("int", 1, MAX_SMALL), "head_dim": ("int", 1, MAX_SMALL),
    "n_groups": ("int", 1, MAX_SMALL), "chunk_size": ("int", 1, 1 << 14),
}
# The fields every hybrid family shares (each family module adds its own: SCHEMA there).
HYBRID_SCHEMA = {
    **COMMON_SCHEMA, "num_attention_heads": ("int", 1, MAX_SMALL), "num_key_value_heads": ("int", 1, MAX_SMALL),
    "head_dim": ("int", 1, MAX_SMALL), "mamba_n_heads": ("int", 1, MAX_SMALL), "mamba_d_head": ("int", 1, MAX_SMALL),
    "mamba_d_state": ("int", 1, MAX_SMALL), "mamba_d_conv": ("int", 2, 64), "mamba_expand": ("num", 0, 64),
    "mamba_n_groups": ("int", 1, MAX_SMALL), "mamba_chunk_size": ("int", 1, 1 << 14),
    "mamba_conv_bias": ("bool", None, None), "mamba_proj_bias": ("bool", None, None),
    "attention_bias": ("bool", None, None), "mlp_bias": ("bool", None, None),
    "num_local_experts": ("int", 0, MAX_SMALL), "num_experts_per_tok": ("int", 0, MAX_SMALL),
}


def check_schema(raw: dict, schema: dict) -> None:
    """One pass over config.json's fields against schema; ScanExportError naming the first bad
    field, what was expected and what arrived."""
    vocab = raw.get("vocab_size")
    for key, (kind, low, high) in schema.items():
        v = raw.get(key)
        if v is None:
            continue
        if kind == "rank" and v == "auto":
            continue
        if kind == "token":
            ids = v if isinstance(v, list) else [v]
            top = vocab if _is_int(vocab) else MAX_VOCAB
            if not ids or not all(_is_int(i) and 0 <= i < top for i in ids):
                raise ScanExportError(f"field {key!r}: expected a token id in [0, {top}) (vocab_size) or a list of "
                                      f"them, got {_show(v)}")
            continue
        if kind == "bool":
            ok, want = isinstance(v, bool), "true or false"
        elif kind == "num":
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low < v <= high)
            want = f"a number in ({low:g}, {high:g}]"
        else:  # int, rank
            ok, want = _is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]" + (" or \"auto\"" if kind == "rank" else "")
        if not ok:
            raise ScanExportError(f"field {key!r}: expected {want}, got {_show(v)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v) -> str:
    text = json.dumps(v) if isinstance(v, (bool, str, list, dict)) or v is None else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def lower_bound_bytes(raw: dict, itemsize: int) -> int:
    """A lower bound on the weights config.json asks for: the embedding table (and an untied lm_head
    as large), in every family; checked against free disk and memory before anything is built."""
    vocab, hidden = raw.get("vocab_size"), raw.get("hidden_size")
    if not (_is_int(vocab) and _is_int(hidden)):
        return 0
    return vocab * hidden * itemsize * (1 if raw.get("tie_word_embeddings", True) else 2)


# The model types this config reads (families/mamba.py registers them; tests/test_family_registry.py
# checks the two agree). A list here, not a registry lookup: the family files import this module.
MAMBA_LM_TYPES = ("mamba", "falcon_mamba", "mamba2")


@dataclass(frozen=True)
class MambaLMConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    state_size: int
    conv_kernel: int
    time_step_rank: int
    num_hidden_layers: int
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    mixer_rms_eps: float = 1e-6
    tie_word_embeddings: bool = True
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    # Mamba-2 only
    num_heads: int = 0
    head_dim: int = 0
    n_groups: int = 1
    chunk_size: int = 64
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    # after the conv (transformers' ACT2FN[hidden_act]); the output gate is silu whatever this says
    hidden_act: str = "silu"

    @property
    def conv_dim(self) -> int:
        """Channels the conv sees: d_inner for Mamba-1, d_inner + 2·g·n (x, B, C) for Mamba-2."""
        if self.model_type == "mamba2":
            return self.intermediate_size + 2 * self.n_groups * self.state_size
        return self.intermediate_size

    @classmethod
    def from_hf(cls, cfg: dict) -> MambaLMConfig:
        model_type = cfg.get("model_type")
        supported = list(MAMBA_LM_TYPES)
        if model_type not in supported:
            raise ScanExportError(f"field 'model_type': expected one of {supported}, got {model_type!r}")
        hidden_act = read_activation(cfg, "hidden_act", "silu")  # every released Mamba uses silu
        hidden = cfg["hidden_size"]
        rank = cfg.get("time_step_rank", "auto")
        eos = cfg.get("eos_token_id")
        mamba2 = {}
        if model_type == "mamba2":
            mamba2 = dict(num_heads=cfg["num_heads"], head_dim=cfg["head_dim"], n_groups=cfg.get("n_groups", 1),
                          chunk_size=cfg.get("chunk_size", 256),
                          time_step_limit=tuple(_json_float(v) for v in cfg.get("time_step_limit", (0.0, "inf"))))
            if int(cfg.get("expand", 2) * hidden) != mamba2["num_heads"] * mamba2["head_dim"]:
                raise ScanExportError("fields hidden_size * expand: expected to equal num_heads * head_dim for mamba2, got "
                                      f"{hidden} * {cfg.get('expand', 2)} vs {mamba2['num_heads']} * {mamba2['head_dim']}")
        return cls(**mamba2,
            model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or cfg.get("expand", 2) * hidden),
            state_size=cfg.get("state_size", 16), conv_kernel=cfg.get("conv_kernel", 4),
            time_step_rank=-(-hidden // 16) if rank == "auto" else int(rank),
            num_hidden_layers=cfg["num_hidden_layers"], layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            use_bias=cfg.get("use_bias", False), use_conv_bias=cfg.get("use_conv_bias", True),
            mixer_rms_eps=cfg.get("mixer_rms_eps", 1e-6), tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            eos_token_id=eos[0] if isinstance(eos, list) else eos, bos_token_id=cfg.get("bos_token_id"),
            hidden_act=hidden_act,
        )

    def check(self) -> None:
        """Sizes a model can be built from; one line naming the field otherwise."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "state_size", "time_step_rank",
                     "num_hidden_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ScanExportError(f"field {name!r}: expected a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.conv_kernel, int) or self.conv_kernel < 2:
            raise ScanExportError(f"field 'conv_kernel': expected an integer >= 2, got {self.conv_kernel!r}")

    def state_shapes(self) -> tuple[tuple, tuple]:
        """Per-layer (conv_state, ssm_state) shapes without the batch dimension."""
        conv = (self.conv_kernel - 1, self.conv_dim)
        if self.model_type == "mamba2":
            return conv, (self.num_heads, self.head_dim, self.state_size)
        return conv, (self.state_size, self.intermediate_size)

    @property
    def layer_kind(self) -> str:
        return MAMBA2 if self.model_type == "mamba2" else MAMBA1

    def cache_tensors(self):
        return mamba_cache(*self.state_shapes())

    def cache_layout(self):
        """[(layer, kind, [CacheTensor])] in the graph's order (HybridConfig.cache_layout's form)."""
        return [(i, self.layer_kind, self.cache_tensors()) for i in range(self.num_hidden_layers)]


def _json_float(v) -> float:
    """transformers writes infinity into config.json as {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)




# ------------------------------------------------------------------------------------------------
# Hybrid models: Mamba-2 layers and attention layers in one stack (bamba, granitemoehybrid, ...)

# A layer's kind (contract/kinds.py: MAMBA1, MAMBA2, ATTENTION, PARALLEL, FFN, the names
# scan_export.json uses) says which of its config's parts carry a cache; each part's
# cache_tensors() says which tensors (HybridConfig.cache_layout).
# transformers' names for a layer's kind, current and legacy (configuration_utils._LEGACY_LAYER_TYPE_REMAP).
LAYER_TYPE_NAMES = {"linear_attention": MAMBA2, "mamba": MAMBA2, "full_attention": ATTENTION, "attention": ATTENTION}
ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class Mamba2Dims:
    """The sizes of a Mamba-2 mixer, named as MambaLMConfig names them (Mamba2Mixer reads either)."""

    hidden_size: int
    intermediate_size: int
    state_size: int
    conv_kernel: int
    num_heads: int
    head_dim: int
    n_groups: int
    chunk_size: int
    time_step_limit: tuple[float, float]
    use_bias: bool
    use_conv_bias: bool
    layer_norm_epsilon: float  # the gated norm's eps
    hidden_act: str = "silu"  # after the conv: Falcon-H1 reads hidden_act; bamba / granite admit silu only

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def state_shapes(self) -> tuple[tuple, tuple]:
        return (self.conv_kernel - 1, self.conv_dim), (self.num_heads, self.head_dim, self.state_size)

    def cache_tensors(self):
        return mamba_cache(*self.state_shapes())


@dataclass(frozen=True)
class Mamba1Dims:
    """The sizes of a Mamba-1 mixer (Jamba's), named as MambaLMConfig names them (MambaMixer reads either)."""

    hidden_size: int
    intermediate_size: int
    state_size: int
    conv_kernel: int
    time_step_rank: int
    use_bias: bool
    use_conv_bias: bool
    model_type: str = "jamba"  # MambaMixer's FalconMamba test reads it
    hidden_act: str = "silu"  # after the conv (ACT2FN[hidden_act]); the output gate is silu whatever this says

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size

    def state_shapes(self) -> tuple[tuple, tuple]:
        """The Mamba-1 exports' layout (MambaLMConfig.state_shapes): both channels last."""
        return (self.conv_kernel - 1, self.intermediate_size), (self.state_size, self.intermediate_size)

    def cache_tensors(self):
        return mamba_cache(*self.state_shapes())


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding as transformers computes it: inv_freq over the first `rotary_dim` channels
    (head_dim · partial_rotary_factor), divided by `factor` for rope_type "linear"."""

    theta: float
    rotary_dim: int
    factor: float = 1.0


@dataclass(frozen=True)
class AttentionDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float  # multiplies q·k (head_dim**-0.5, or granite's attention_multiplier)
    bias: bool
    rope: RopeSpec | None  # None: no position embedding at all (granite's position_embedding_type None)

    def cache_tensors(self):
        return attention_cache(self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class HybridConfig:
    """What a hybrid model's modules are built from; the family modules (bamba.py, ...) read config.json into it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]  # a kind per layer (contract/kinds.py)
    rms_norm_eps: float
    mamba: Mamba2Dims | Mamba1Dims  # Mamba1Dims for a model whose Mamba layers are MAMBA1
    attention: AttentionDims
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    # feed-forward: a SwiGLU MLP of intermediate_size (bamba), or granite's shared MLP plus top-k experts
    intermediate_size: int = 0
    mlp_bias: bool = False
    shared_intermediate_size: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    # granite's scalings: embeddings ×, each residual branch ×, logits ÷
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @property
    def state_size(self) -> int:
        return self.mamba.state_size

    @property
    def conv_kernel(self) -> int:
        return self.mamba.conv_kernel

    def cache_layout(self):
        """[(layer, kind, [CacheTensor (name, shape without batch, dtype class)])] in the graph's order.
        dtype class "state" is float32 (the scan state); "model" is the model dtype. The KV cache's
        sequence axis is the string "past_seqlen". Each kind's parts (kinds.KIND_PARTS: this
        config's `mamba`, `attention`) declare their own tensors."""
        return [(i, kind, [t for part in KIND_PARTS[kind] for t in getattr(self, part).cache_tensors()])
                for i, kind in enumerate(self.layer_types)]


def json_float(v) -> float:
    return _json_float(v)


def layer_kinds(raw_types, field: str) -> tuple[str, ...]:
    """transformers' per-layer type names -> MAMBA2 / ATTENTION; anything else is refused naming the field."""
    kinds = []
    for i, t in enumerate(raw_types):
        if t not in LAYER_TYPE_NAMES:
            raise ScanExportError(f"field {field!r}: layer {i} is {t!r}; supported values are {sorted(LAYER_TYPE_NAMES)}")
        kinds.append(LAYER_TYPE_NAMES[t])
    return tuple(kinds)


def rope_spec(cfg: dict, head_dim: int, partial_rotary_factor: float | None = None) -> RopeSpec:
    """config.json's rope_parameters (transformers 5) or rope_theta / rope_scaling (older files)."""
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        params = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
        params.setdefault("rope_type", params.pop("type", "default"))
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ScanExportError(f"field 'rope_parameters.rope_type': expected one of {list(ROPE_TYPES)}, got {rope_type!r}")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    partial = partial_rotary_factor if partial_rotary_factor is not None else params.get("partial_rotary_factor", 1.0)
    return RopeSpec(theta=float(params.get("rope_theta", 10000.0)), rotary_dim=int(head_dim * partial), factor=factor)


def eos_id(cfg: dict) -> int | None:
    eos = cfg.get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos
