"""The data file's layout and the final model file(s): external-data references, compacting the
data file, and assembling one self-contained model.onnx from protobuf fragments streamed out of it."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..progress import Progress, silent

DATA_SUFFIX = ".data"
BLOCK_BYTES = 64 * 2**20  # rows read, converted and written per step
ALIGN_BYTES, ALIGN_FROM = 65536, 2**20  # tensors >= 1 MiB start at a 64 KiB offset (mmap-friendly, as onnx_ir does)


def _align(offset: int, length: int) -> int:
    return -(-offset // ALIGN_BYTES) * ALIGN_BYTES if length >= ALIGN_FROM else offset


def _external_refs(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def _ext(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def model_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of all initializers, inline and external."""
    return sum(int(_ext(t)["length"]) if t.data_location == onnx.TensorProto.EXTERNAL
               else len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)


def _move_inline_to_data(proto: onnx.ModelProto, data_path: Path, threshold: int) -> None:
    """Append the inline initializers of at least threshold bytes to data_path (small: what the
    optimizer folded, and the weights attach kept in memory) and refer to them there."""
    with open(data_path, "ab") as f:
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") or len(t.raw_data) < threshold:
                continue
            offset = _align(f.tell(), len(t.raw_data))
            f.write(b"\0" * (offset - f.tell()))
            f.write(t.raw_data)
            length = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)


def _wasted(refs, data_path: Path) -> bool:
    used = sum(int(_ext(t)["length"]) for t in refs)
    return data_path.stat().st_size - used >= ALIGN_BYTES * max(1, len(refs))  # more than alignment padding


def _compact(proto, refs, data_path: Path, progress: Progress) -> None:
    """Rewrite data_path with only the tensors proto references (the optimizer folded some away)."""
    tmp = data_path.with_name(data_path.name + ".compact")
    total, done = sum(int(_ext(t)["length"]) for t in refs), 0
    with open(data_path, "rb") as src, open(tmp, "wb") as dst:
        for t in refs:
            e = _ext(t)
            length = int(e["length"])
            offset = _align(dst.tell(), length)
            dst.write(b"\0" * (offset - dst.tell()))
            for n in _copy_range(src, int(e.get("offset", 0)), length, dst):
                done += n
                progress("compacting weights", done, total)
            for entry in t.external_data:
                if entry.key == "offset":
                    entry.value = str(offset)
    os.replace(tmp, data_path)


def _copy_range(src, offset: int, length: int, dst):
    src.seek(offset)
    while length:
        chunk = src.read(min(length, BLOCK_BYTES))
        if not chunk:
            raise RuntimeError(f"{src.name} ends early")  # we wrote it: a bug, not a user mistake
        dst.write(chunk)
        length -= len(chunk)
        yield len(chunk)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def assemble_single_file(path, progress: Progress = silent) -> Path:
    """Turn path (+ its external data file) into one self-contained model file, one tensor in memory
    at most a block at a time.

    Protobuf merges a message field that occurs twice, and appends to repeated fields, so
    `model without initializers` followed by `ModelProto{graph{initializer: t}}` per tensor parses as
    the whole model with the initializers in their original order. Each tensor's raw_data is
    copied from the data file in blocks, behind its hand-written tag and length."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    inits = list(proto.graph.initializer)
    del proto.graph.initializer[:]
    data_path = path.with_name(path.name + DATA_SUFFIX)
    tmp = path.with_name(path.name + ".single")
    total = sum(int(_ext(t)["length"]) for t in inits if t.data_location == onnx.TensorProto.EXTERNAL)
    done = 0
    with open(tmp, "wb") as out, (open(data_path, "rb") if total else open(os.devnull, "rb")) as data:
        out.write(proto.SerializeToString())
        for t in inits:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                body = t.SerializeToString()
                graph = _field(INITIALIZER_FIELD, len(body)) + body
                out.write(_field(GRAPH_FIELD, len(graph)) + graph)
                continue
            e = _ext(t)
            head = onnx.TensorProto()
            head.CopyFrom(t)
            head.ClearField("external_data")
            head.ClearField("data_location")
            length = int(e["length"])
            header = head.SerializeToString() + _field(RAW_DATA_FIELD, length)
            tensor_len = len(header) + length
            graph_head = _field(INITIALIZER_FIELD, tensor_len)
            out.write(_field(GRAPH_FIELD, len(graph_head) + tensor_len) + graph_head + header)
            for n in _copy_range(data, int(e.get("offset", 0)), length, out):
                done += n
                progress("writing model file", done, total)
    os.replace(tmp, path)
    if data_path.exists():
        data_path.unlink()
    return path
