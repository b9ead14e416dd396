"""Mamba / FalconMamba language models with the recurrent state as explicit inputs and outputs.

These are the modules that get exported. Parameter names match Hugging Face checkpoints
(`backbone.layers.{i}.mixer.in_proj.weight`, ...), so weights load by name with no conversion, and
the arithmetic follows transformers' `MambaMixer` slow path step for step.

Glossary: b batch, l seqlen, h hidden_size, d intermediate_size (d_inner), n state_size,
K conv_kernel, r time_step_rank, V vocab_size.
Per layer i the state is conv_state_i: (b, K−1, d) and ssm_state_i: (b, n, d) (float32): both
channels-last, the layout the exported scan works in, so a decode step spends no transposes on
them (transformers keeps (b, d, K) and (b, d, n); verify maps between the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .custom_ops import causal_conv, mamba_chunk_scan_combined, selective_scan_fn
from ..errors import ScanExportError, read_json_object

SUPPORTED_MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2")


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

    @property
    def conv_dim(self) -> int:
        """Channels the conv sees: d_inner for Mamba-1, d_inner + 2·g·n (x, B, C) for Mamba-2."""
        if self.model_type == "mamba2":
            return self.intermediate_size + 2 * self.n_groups * self.state_size
        return self.intermediate_size

    @classmethod
    def from_hf(cls, cfg: dict) -> MambaLMConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ScanExportError(f"field 'model_type': expected one of {list(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ScanExportError(f"field 'hidden_act': expected 'silu' (as in every released Mamba), got {cfg['hidden_act']!r}")
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


def _json_float(v) -> float:
    """transformers writes infinity into config.json as {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def _rms_normalize(x32, eps: float):
    """x / sqrt(mean(x²) + eps). transformers writes x·rsqrt(·); the division is the same to one
    rounding, and it is the pattern onnxruntime fuses into one SimplifiedLayerNormalization kernel
    (seven ops per norm otherwise, which a decode step pays 49 times)."""
    return x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """transformers' MambaRMSNorm: normalize in float32, scale in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        return self.weight * _rms_normalize(x.float(), self.eps).to(dtype)


def weightless_rms(x, eps: float):
    """FalconMamba's extra norm on Δ, B and C (no weight)."""
    return _rms_normalize(x.float(), eps).type_as(x)


class MambaMixer(nn.Module):
    def __init__(self, cfg: MambaLMConfig):
        super().__init__()
        d, n, r = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * d, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(d, d, cfg.conv_kernel, groups=d, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, n))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x, conv_state, ssm_state):
        """x: (b, l, h), conv_state: (b, K−1, d), ssm_state: (b, n, d) -> (y: (b, l, h), conv_state', ssm_state')

        Activations stay (b, l, ·) around every linear layer; only the scan sees (b, d, l), and in
        the exported graph those transposes cancel against the lowering's own.
        """
        cfg = self.cfg
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d) each
        u, conv_state = causal_conv(u, conv_state, self.conv1d.weight, self.conv1d.bias)
        u = F.silu(u)
        dt, B, C = self.x_proj(u).split([cfg.time_step_rank, cfg.state_size, cfg.state_size], dim=-1)
        if cfg.model_type == "falcon_mamba":
            dt, B, C = (weightless_rms(t, cfg.mixer_rms_eps) for t in (dt, B, C))
        dt = F.linear(dt, self.dt_proj.weight)  # (b, l, d); the bias goes in as delta_bias
        y, ssm_state = selective_scan_fn(
            u.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2),
            C.transpose(1, 2), self.D.float(), z.transpose(1, 2), self.dt_proj.bias.float(), True,
            return_last_state=True, initial_state=ssm_state.transpose(1, 2),
        )
        return self.out_proj(y.transpose(1, 2).to(x.dtype)), conv_state, ssm_state.transpose(1, 2)


class GatedRMSNorm(nn.Module):
    """transformers' MambaRMSNormGated: y·silu(z), normalized per group of group_size, then scaled."""

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, gate):
        dtype = y.dtype
        y = y.float() * F.silu(gate.float())
        *lead, last = y.shape
        grouped = y.reshape(*lead, last // self.group_size, self.group_size)
        grouped = _rms_normalize(grouped, self.eps)
        return self.weight * grouped.reshape(*lead, last).to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: MambaLMConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.intermediate_size, cfg.num_heads
        self.in_proj = nn.Linear(cfg.hidden_size, d + cfg.conv_dim + h, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(d, d // cfg.n_groups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(d, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x, conv_state, ssm_state):
        """x: (b, l, hidden), conv_state: (b, K−1, conv_dim), ssm_state: (b, h, p, n)"""
        cfg = self.cfg
        b, l, _ = x.shape
        gn = cfg.n_groups * cfg.state_size
        gate, xBC, dt = self.in_proj(x).split([cfg.intermediate_size, cfg.conv_dim, cfg.num_heads], dim=-1)
        xBC, conv_state = causal_conv(xBC, conv_state, self.conv1d.weight, self.conv1d.bias)
        xs, B, C = F.silu(xBC).split([cfg.intermediate_size, gn, gn], dim=-1)
        y, ssm_state = mamba_chunk_scan_combined(
            xs.reshape(b, l, cfg.num_heads, cfg.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, l, cfg.n_groups, cfg.state_size), C.reshape(b, l, cfg.n_groups, cfg.state_size),
            cfg.chunk_size if cfg.chunk_size <= 64 else 64, D=self.D, dt_bias=self.dt_bias,
            initial_states=ssm_state, dt_softplus=True, dt_limit=cfg.time_step_limit, return_final_states=True,
            state_dtype=torch.float32,  # the contract's ssm_state is float32 (mamba would return C's dtype)
        )
        y = self.norm(y.reshape(b, l, cfg.intermediate_size), gate)
        return self.out_proj(y.to(x.dtype)), conv_state, ssm_state


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


# ------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints


def read_hf_config(checkpoint_dir) -> dict:
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise ScanExportError(f"checkpoint_dir {str(path)!r} does not exist or is not a directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ScanExportError(f"checkpoint_dir {str(path)!r} has no config.json; expected a Hugging Face checkpoint directory")
    return read_json_object(cfg_path)


def load_hf_state_dict(checkpoint_dir) -> dict[str, torch.Tensor]:
    """model.safetensors, sharded safetensors (index), or pytorch_model.bin (weights_only=True)."""
    path = Path(checkpoint_dir)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        from safetensors import SafetensorError

        state = {}
        for shard in shards:
            try:
                state.update(load_file(str(shard)))
            except (SafetensorError, OSError) as e:  # truncated, corrupt, or not safetensors at all
                raise ScanExportError(f"{shard}: expected a safetensors file, could not read it ({e})") from None
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        import pickle
        import zipfile

        state = {}
        for b in bins:
            try:
                part = torch.load(str(b), map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ScanExportError(f"{b}: expected a PyTorch state dict, could not read it ({first})") from None
            if not isinstance(part, dict):
                raise ScanExportError(f"{b}: expected a state dict, got a {type(part).__name__}")
            state.update(part)
        return state
    raise ScanExportError(f"checkpoint_dir {str(path)!r} has no weights (*.safetensors or pytorch_model*.bin)")


def read_mamba_config(checkpoint_dir) -> MambaLMConfig:
    """The checked MambaLMConfig of a local HF checkpoint; mistakes name config.json and the field."""
    cfg_path = Path(checkpoint_dir) / "config.json"
    raw = read_hf_config(checkpoint_dir)
    try:
        cfg = MambaLMConfig.from_hf(raw)
        cfg.check()
    except KeyError as e:
        raise ScanExportError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ScanExportError):
            raise ScanExportError(f"{cfg_path}: {e}") from None
        raise ScanExportError(f"{cfg_path}: a field has the wrong type or value ({e})") from None
    return cfg


def checkpoint_names(checkpoint_dir, cfg: MambaLMConfig, shapes: dict, wanted: dict) -> dict[str, str]:
    """{parameter name: checkpoint tensor name} for every parameter in wanted ({name: shape}), given
    the checkpoint's {name: shape}: the old `backbone.embedding.` name is accepted, a tied lm_head
    reads the embeddings. Raises naming the missing weights, or the first one of the wrong shape."""
    names = {k.replace("backbone.embedding.", "backbone.embeddings."): k for k in shapes}  # old name
    if "lm_head.weight" not in names and cfg.tie_word_embeddings and "backbone.embeddings.weight" in names:
        names["lm_head.weight"] = names["backbone.embeddings.weight"]
    missing = sorted(k for k in wanted if k not in names)
    if missing:
        raise ScanExportError(f"checkpoint {str(checkpoint_dir)!r} is missing {len(missing)} weight(s) config.json "
                              f"asks for: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for k, shape in wanted.items():
        if tuple(shapes[names[k]]) != tuple(shape):
            raise ScanExportError(f"checkpoint {str(checkpoint_dir)!r}: weight {k} expected shape {tuple(shape)} "
                                  f"(from config.json), got {tuple(shapes[names[k]])}")
    return {k: names[k] for k in wanted}


def load_mamba_lm(checkpoint_dir, dtype=torch.float32) -> MambaLM:
    """Build a MambaLM from a local HF checkpoint; every parameter must be found by name."""
    cfg = read_mamba_config(checkpoint_dir)
    model = MambaLM(cfg)
    state = {k: v for k, v in load_hf_state_dict(checkpoint_dir).items() if v is not None}
    wanted = {k: p.shape for k, p in model.named_parameters()}
    names = checkpoint_names(checkpoint_dir, cfg, {k: v.shape for k, v in state.items()}, wanted)
    model.load_state_dict({k: state[names[k]] for k in wanted}, strict=True)
    return model.to(dtype).eval()
