"""Loading Hugging Face checkpoints: config.json, weights (safetensors or pytorch_model.bin), by name."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ScanExportError, read_json_object
from .config import MAMBA_SCHEMA, MambaLMConfig, check_schema
from .families import get as family_of
from .families import hybrid_types, model_types
from .families.mamba import MambaLM


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


def checked_config(checkpoint_dir) -> dict:
    """config.json after its family's field schema (one line naming the file and field otherwise):
    the one validation pass export_model runs before any work."""
    raw = read_hf_config(checkpoint_dir)
    family = family_of(raw.get("model_type"))
    if family is None:
        raise ScanExportError(f"{Path(checkpoint_dir) / 'config.json'}: field 'model_type': expected one of "
                              f"{all_model_types()}, got {raw.get('model_type')!r}")
    return _parse_config(checkpoint_dir, lambda r: r, family.schema)


def _parse_config(checkpoint_dir, parse, schema):
    """parse(config.json's dict) after one pass of the family's field schema (config.check_schema),
    with a missing field or a bad value reported as one line naming the file."""
    cfg_path = Path(checkpoint_dir) / "config.json"
    raw = read_hf_config(checkpoint_dir)
    try:
        check_schema(raw, schema)
        return parse(raw)
    except KeyError as e:
        raise ScanExportError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ScanExportError):
            raise ScanExportError(f"{cfg_path}: {e}") from None
        raise ScanExportError(f"{cfg_path}: a field has the wrong type or value ({e})") from None


def _load_weights(model, state: dict, checkpoint_dir) -> None:
    """Every parameter of model from state by name, shapes checked; tied parameters are loaded once."""
    wanted = dict(model.named_parameters())  # a tied lm_head is the embedding's parameter: listed once
    missing = sorted(k for k in wanted if state.get(k) is None)
    if missing:
        raise ScanExportError(f"checkpoint {str(checkpoint_dir)!r} is missing {len(missing)} weight(s) config.json "
                              f"asks for: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for k, p in wanted.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ScanExportError(f"checkpoint {str(checkpoint_dir)!r}: weight {k} expected shape {tuple(p.shape)} "
                                  f"(from config.json), got {tuple(state[k].shape)}")
    with torch.no_grad():
        for k, p in wanted.items():
            p.copy_(state[k])


def read_mamba_config(checkpoint_dir) -> MambaLMConfig:
    """The checked MambaLMConfig of a local HF checkpoint; mistakes name config.json and the field."""

    def parse(raw):
        cfg = MambaLMConfig.from_hf(raw)
        cfg.check()
        return cfg

    return _parse_config(checkpoint_dir, parse, MAMBA_SCHEMA)


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


def hybrid_families() -> dict:
    """model_type -> its families.Family, for the hybrids (HybridLM models)."""
    return {t: family_of(t) for t in hybrid_types()}


def stacked_tensors(checkpoint_dir, tensors: dict, combine) -> dict:
    """tensors ({checkpoint name: tensor or TensorSource}) plus the parameters a family stacks from
    several checkpoint tensors (jamba's experts: the family's `stacked(names)` says which, per row
    of the stacked parameter, are concatenated on axis 0); combine(rows of tensors) makes one.
    Names the checkpoint already holds are left as they are."""
    family = hybrid_families().get(read_hf_config(checkpoint_dir).get("model_type"))
    recipe = family.stacked if family is not None else None
    if recipe is None:
        return tensors
    extra = {}
    for k, rows in recipe(list(tensors)).items():
        if k in tensors:
            continue
        for row in rows[1:]:
            for n, n0 in zip(row, rows[0]):
                if tuple(tensors[n].shape) != tuple(tensors[n0].shape):
                    raise ScanExportError(f"checkpoint {str(checkpoint_dir)!r}: weight {n} has shape "
                                          f"{tuple(tensors[n].shape)}, expected {tuple(tensors[n0].shape)} (as {n0})")
        extra[k] = combine([[tensors[n] for n in row] for row in rows])
    return {**tensors, **extra}


def _renamed(family, names) -> dict:
    """{our name: checkpoint name} after the family's RENAMES."""
    out = {}
    for k in names:
        new = k
        for old, repl in family.renames:
            new = new.replace(old, repl)
        out[new] = k
    return out


def stack_rows(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """The eager combine for stacked_tensors: torch.stack of each row's torch.cat on axis 0."""
    return torch.stack([torch.cat(row, dim=0) for row in rows])


def load_hybrid_lm(checkpoint_dir, dtype=torch.float32):
    """Build a hybrid LM (any of hybrid_families()) from a local HF checkpoint, weights by name."""
    raw = read_hf_config(checkpoint_dir)
    families = hybrid_families()
    family = families.get(raw.get("model_type"))
    if family is None:
        raise ScanExportError(f"{Path(checkpoint_dir) / 'config.json'}: field 'model_type': expected one of "
                              f"{sorted(families)}, got {raw.get('model_type')!r}")
    model = _parse_config(checkpoint_dir, family.build, family.schema)
    state = stacked_tensors(checkpoint_dir, load_hf_state_dict(checkpoint_dir), stack_rows)
    state = {new: state[k] for new, k in _renamed(family, state).items()}
    _load_weights(model, state, checkpoint_dir)
    return model.to(dtype).eval()


def model_blueprint(checkpoint_dir):
    """(build, names) for any supported checkpoint, reading config.json only: build() makes the
    (unloaded) model; names(model, shapes) maps each of its parameters to the checkpoint tensor
    holding it, given the checkpoint's {name: shape}, and raises naming missing or misshapen weights.
    The memory-lean export (onnx/fake_params.py) uses it to trace a model whose weights stay on disk."""
    model_type = read_hf_config(checkpoint_dir).get("model_type")
    family = hybrid_families().get(model_type)
    if family is None:
        if family_of(model_type) is None:
            raise ScanExportError(f"{Path(checkpoint_dir) / 'config.json'}: field 'model_type': expected one of "
                                  f"{all_model_types()}, got {model_type!r}")
        cfg = read_mamba_config(checkpoint_dir)

        def names(model, shapes):
            wanted = {k: tuple(p.shape) for k, p in model.named_parameters()}
            return checkpoint_names(checkpoint_dir, cfg, shapes, wanted)

        return (lambda: MambaLM(cfg)), names

    raw = read_hf_config(checkpoint_dir)
    _parse_config(checkpoint_dir, family.build, family.schema)  # config mistakes surface here, before any tracing

    def names(model, shapes):
        renamed = _renamed(family, shapes)  # our name -> checkpoint name (stacked ones: stacked_tensors)
        shape_of = {new: tuple(shapes[k]) for new, k in renamed.items()}
        wanted = dict(model.named_parameters())  # a tied lm_head is the embedding's parameter: listed once
        missing = sorted(k for k in wanted if k not in renamed)
        if missing:
            raise ScanExportError(f"checkpoint {str(checkpoint_dir)!r} is missing {len(missing)} weight(s) config.json "
                                  f"asks for: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        for k, p in wanted.items():
            if shape_of[k] != tuple(p.shape):
                raise ScanExportError(f"checkpoint {str(checkpoint_dir)!r}: weight {k} expected shape {tuple(p.shape)} "
                                      f"(from config.json), got {shape_of[k]}")
        return {k: renamed[k] for k in wanted}

    return (lambda: family.build(raw)), names


def load_model(checkpoint_dir, dtype=torch.float32):
    """Any supported checkpoint: a MambaLM for mamba / falcon_mamba / mamba2, a hybrid LM otherwise."""
    model_type = read_hf_config(checkpoint_dir).get("model_type")
    if model_type in hybrid_families():
        return load_hybrid_lm(checkpoint_dir, dtype)
    if family_of(model_type) is None:
        raise ScanExportError(f"{Path(checkpoint_dir) / 'config.json'}: field 'model_type': expected one of "
                              f"{all_model_types()}, got {model_type!r}")
    return load_mamba_lm(checkpoint_dir, dtype)


def all_model_types() -> list[str]:
    return model_types()
