"""Checkpoint tensors read lazily: headers now, rows when asked, so that a whole-model export never
holds all the weights (fake_params.py streams them from here into the data file)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ScanExportError


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass
class TensorSource:
    """One checkpoint tensor, not loaded: rows(r0, r1) reads rows [r0, r1) of its first axis."""

    shape: tuple
    dtype: object  # torch.dtype
    path: Path
    offset: int = 0  # safetensors: where the bytes start in path
    tensor: object = None  # pytorch_model*.bin: the (mmap-backed where possible) tensor

    def rows(self, r0: int, r1: int):
        import torch

        if self.tensor is not None:
            return self.tensor[r0:r1] if self.shape else self.tensor
        row = _numel(self.shape[1:]) * self.dtype.itemsize
        n = (r1 - r0) * row if self.shape else self.dtype.itemsize
        buf = bytearray(n)
        with open(self.path, "rb") as f:  # plain reads: the page cache is not this process's RSS (mmap's would be)
            f.seek(self.offset + r0 * row)
            if f.readinto(buf) != n:
                raise ScanExportError(f"{self.path}: expected a safetensors file, it ends inside a tensor (truncated?)")
        t = torch.frombuffer(buf, dtype=self.dtype) if n else torch.empty(0, dtype=self.dtype)
        return t.reshape(((r1 - r0), *self.shape[1:]) if self.shape else ())


class StackedSource(TensorSource):
    """A parameter the checkpoint stores in pieces (jamba's experts): row e of the stack is the
    concatenation on axis 0 of parts[e] (TensorSources of equal trailing shape). rows(r0, r1) reads
    only those rows' pieces, so the memory-lean export streams it like any other tensor."""

    def __init__(self, parts: list[list[TensorSource]]):
        first = parts[0][0]
        super().__init__((len(parts), sum(p.shape[0] for p in parts[0]), *first.shape[1:]), first.dtype, first.path)
        self.parts = parts

    def rows(self, r0: int, r1: int):
        import torch

        return torch.stack([torch.cat([p.rows(0, p.shape[0]).to(self.dtype) for p in row]) for row in self.parts[r0:r1]])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def checkpoint_tensors(checkpoint_dir) -> dict[str, TensorSource]:
    """{name: TensorSource} of a checkpoint's weights, reading only headers: safetensors (one file or
    shards), else pytorch_model*.bin (loaded with mmap=True where the file allows, so its tensors
    are paged in only when read). Errors as reference.models.load_hf_state_dict raises them."""
    import torch

    path = Path(checkpoint_dir)
    shards = sorted(path.glob("*.safetensors"))
    out = {}
    if shards:
        from safetensors import SafetensorError, safe_open

        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt"):  # validates the header against the file size
                    pass
                with open(shard, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
            except (SafetensorError, OSError, ValueError, struct.error) as e:
                raise ScanExportError(f"{shard}: expected a safetensors file, could not read it ({e})") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ScanExportError(f"{shard}: tensor {name} has dtype {info['dtype']}, expected one of "
                                          f"{sorted(SAFETENSORS_DTYPES)}")
                out[name] = TensorSource(tuple(info["shape"]), getattr(torch, SAFETENSORS_DTYPES[info["dtype"]]),
                                         shard, 8 + n + info["data_offsets"][0])
        return out
    from ..reference.models import load_hf_state_dict

    if sorted(path.glob("pytorch_model*.bin")):
        try:
            state = _load_bins_mmap(path)
        except Exception:  # legacy (non-zip) pickles cannot be mapped: load them as the eager path does
            state = load_hf_state_dict(path)
    else:
        state = load_hf_state_dict(path)  # raises: no weights
    return {k: TensorSource(tuple(v.shape), v.dtype, path, tensor=v) for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def _load_bins_mmap(path: Path) -> dict:
    import torch

    state = {}
    for b in sorted(path.glob("pytorch_model*.bin")):
        part = torch.load(str(b), map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(part, dict):
            raise ValueError("not a state dict")
        state.update(part)
    return state
