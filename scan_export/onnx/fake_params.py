"""Memory-lean weights for whole-model export: the weights never sit in memory all at once. This module
holds the fake-parameter model and the writer of its weights; the checkpoint is read lazily by
lazy_checkpoint.py, the final file(s) are laid out by proto_assembly.py.

The model is traced with fake parameters (shapes and dtypes only: torch.export never reads values).
The traced graph's parameter initializers then become external references into OUT_DIR's
`model.onnx.data`, which is filled one tensor at a time, in blocks of rows, straight from the
checkpoint file (converted to the export dtype on the way, exactly as `tensor.to(float32).to(dtype)`).
Lowering, optimizing and checking then see a graph of a few MB. At the end the model is either
kept with its external data (above the 2 GB protobuf limit) or assembled into one `model.onnx`
by appending each initializer as a protobuf fragment streamed from the data file.

What the optimizer would fold, and where it happens instead:
- Transpose of a 2-D weight with a single consumer (every nn.Linear): onnxscript's optimizer always
  folds it, whatever the size, into a new in-memory initializer. It is folded here instead: the
  weight is written transposed and the Transpose node removed. Transposing is exact.
- weights of at most 8192 elements (the folding limit, _fold_limit) are real tensors from the start (all together < 1% of the
  model): the optimizer's constant folding may read and fold them (Cast, Gather of conv taps), as before.
Bigger weights are never folded (the optimizer's input size limit), so the data file holds only
tensors the final graph references; `finish` checks that and compacts the file if it ever does not.

Peak memory is the traced graph plus one block of rows (BLOCK_BYTES) plus the small weights,
independent of the model's size (measured in README, "Export memory").
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..progress import Progress, silent
from .lazy_checkpoint import StackedSource, TensorSource, _numel, checkpoint_tensors
from .proto_assembly import (BLOCK_BYTES, DATA_SUFFIX, _align, _compact, _external_refs, _move_inline_to_data,
                             _wasted, assemble_single_file)

EXTERNAL_FROM_BYTES = 1024  # with external data, smaller tensors stay in model.onnx (onnx.save_model's default)


def _fold_limit() -> int:
    """Elements above which onnxscript's constant folding leaves a tensor alone."""
    from onnxscript.optimizer import _constant_folding

    return _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT


def fake_model(checkpoint_dir, dtype):
    """(model, weights): the checkpoint's model (MambaLM, or a hybrid LM) whose big parameters
    (> _fold_limit() elements) are fake tensors of the export dtype (torch.export traces them like
    real ones) and whose small ones are real, and the CheckpointWeights that fill the big ones'
    initializers later. A tied parameter (one module's, reused by another) stays one parameter.

    The small ones must be real: exporting at an opset other than torch's own runs onnx's C version
    converter, which serializes every initializer of at most 1000 elements."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from ..reference.models import model_blueprint
    from ..reference.models.loading import stacked_tensors

    build, checkpoint_names = model_blueprint(checkpoint_dir)
    sources = stacked_tensors(checkpoint_dir, checkpoint_tensors(checkpoint_dir), StackedSource)
    # allow_non_fake_inputs: the example inputs (ids, zero states) and small weights stay real tensors.
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build().eval()
    names = checkpoint_names(model, {k: s.shape for k, s in sources.items()})
    old = list(model.parameters())  # kept alive while replaced, so that their ids stay theirs
    name_of = {id(p): k for k, p in model.named_parameters()}  # tied parameters: one name
    # torch.export names a tied parameter once per module that holds it: every name gets the source.
    weights = CheckpointWeights({k: sources[names[name_of[id(p)]]]
                                 for k, p in model.named_parameters(remove_duplicate=False)}, dtype)
    limit = _fold_limit()
    made = {}
    for module in list(model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            # Keyed by checkpoint tensor: parameters read from one tensor (a tied lm_head, even when the
            # model class keeps its own) become one parameter, so the graph holds the table once
            # (Gather and the lm_head's Transpose read one initializer; docs/quantization.md).
            key = names[name_of[id(p)]]
            if key not in made:
                src = weights.sources[name_of[id(p)]]
                if _numel(src.shape) <= limit:
                    value = weights.read(src, key)
                else:
                    with FakeTensorMode(allow_non_fake_inputs=True):
                        value = torch.empty(src.shape, dtype=dtype)
                # model.to(dtype) cannot swap fake parameters in place: set new ones.
                made[key] = torch.nn.Parameter(value, requires_grad=False)
            setattr(module, name, made[key])
    del old
    fake_buffers = [k for k, b in model.named_buffers() if isinstance(b, FakeTensor)]
    if fake_buffers:  # a reference model bug: buffers made in __init__ have no values here
        raise RuntimeError(f"fake_model: buffers {fake_buffers} were made under fake tensors; compute them in forward")
    return model, weights


@dataclass
class _Planned:
    name: str  # the initializer's name in the graph
    source: TensorSource
    transpose: bool
    offset: int = 0
    length: int = 0


class CheckpointWeights:
    """The export's parameters, by name, still in the checkpoint file; attach() puts them into a
    traced onnx_ir model as external data, finish() writes the final model file(s)."""

    def __init__(self, sources: dict[str, TensorSource], dtype):
        self.sources, self.dtype = sources, dtype
        self.data_path: Path | None = None
        # (size, sha256 hex) of the data file as finish() left it, hashed while it was written; None
        # when it was rewritten (compacted) or not kept: then whoever needs its hash reads it whole.
        self.data_digest: tuple[int, str] | None = None
        self._hasher: _FollowingHasher | None = None
        self.written: list[_Planned] = []
        # Weights holding NaN or Inf, by name: loadable, but every logit downstream of them is NaN;
        # export_model warns once, naming the first. Checked on each block as it streams past.
        self.nonfinite: list[str] = []

    @property
    def base_dir(self) -> Path | None:
        return self.data_path.parent if self.data_path else None

    def total_bytes(self) -> int:
        unique = {id(s): s for s in self.sources.values()}.values()  # a tied weight is written once
        return sum(_numel(s.shape) for s in unique) * self.dtype.itemsize

    def attach(self, model, progress: Progress = silent) -> None:
        """Replace the fake parameter initializers of `model` (onnx_ir, as torch.onnx.export made it)
        by their values: small ones in memory, the others as references into self.data_path (set by
        the caller: the model file's name + ".data", in the directory it will be saved to), written now."""
        import onnx_ir as ir
        import torch

        graph = model.graph
        # One initializer per checkpoint tensor: torch.export gives a tied weight (or an untied
        # lm_head that config.json ties to the embeddings) one initializer per name; the others'
        # uses move to the first, so the file stores it once.
        first = {}
        for name, value in list(graph.initializers.items()):
            src = self.sources.get(name)
            if src is None or not _is_fake(value.const_value):
                continue
            if id(src) in first:
                value.replace_all_uses_with(first[id(src)])
                del graph.initializers[name]
            else:
                first[id(src)] = value
        plan = []
        for name, value in list(graph.initializers.items()):
            src = self.sources.get(name)
            if src is None or not _is_fake(value.const_value):
                continue  # a small weight (real, folded by the optimizer as usual) or a constant the exporter lifted
            plan.append(_Planned(name, src, _single_transpose(value, graph) is not None))
        dtype = ir.DataType.from_numpy(torch.empty(0, dtype=self.dtype).numpy().dtype)
        total = sum(_numel(p.source.shape) for p in plan) * self.dtype.itemsize
        done = 0
        with open(self.data_path, "wb") as f:
            self._hasher = _FollowingHasher(self.data_path)
            for p in plan:
                p.length = _numel(p.source.shape) * self.dtype.itemsize
                p.offset = _align(f.tell(), p.length)
                f.write(b"\0" * (p.offset - f.tell()))
                for n in self._write(f, p):
                    done += n
                    progress("writing weights", done, total)
                f.flush()  # bytes [0, offset + length) are final now: the hasher may read them
                self._hasher.follow(p.offset + p.length)
                shape = tuple(reversed(p.source.shape)) if p.transpose else p.source.shape
                tensor = ir.ExternalTensor(self.data_path.name, p.offset, p.length, dtype, shape=ir.Shape(shape),
                                           name=p.name, base_dir=self.base_dir)
                value = graph.initializers[p.name]
                if p.transpose:
                    p.name = _fold_transpose(graph, value, tensor)
                else:
                    value.const_value = tensor
                self.written.append(p)
        progress("writing weights", total, total)

    def _convert(self, t, name: str | None = None):
        """t in the export dtype, through float32: what load_state_dict into float32, then .to(dtype)
        did. With a name, a NaN or Inf in it is recorded (self.nonfinite)."""
        import torch

        t = t.to(torch.float32)
        if name is not None and name not in self.nonfinite and t.numel():
            # One sum (~10x faster than isfinite().all(), which writes a mask) is NaN or Inf when any
            # element is; a finite block whose sum overflowed is told apart by the exact check.
            if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
                self.nonfinite.append(name)
        return t.to(self.dtype)

    def read(self, src: TensorSource, name: str | None = None):
        """The whole tensor, converted: for small ones only."""
        return self._convert(src.rows(0, src.shape[0] if src.shape else 1), name).clone()

    def _write(self, f, p: _Planned):
        """Write p's tensor at p.offset in blocks of rows; yield bytes written per block."""
        shape, item = p.source.shape, self.dtype.itemsize
        rows = shape[0] if shape else 1
        row_bytes = max(1, _numel(shape[1:]) * max(item, p.source.dtype.itemsize, 4))  # the float32 step too
        step = max(1, BLOCK_BYTES // row_bytes)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block = self._convert(p.source.rows(r0, r1), p.name)
            if p.transpose:  # (rows, cols) -> (cols, rows): this block is columns r0..r1 of every output row
                cols = shape[1]
                out = block.T.contiguous().numpy()
                f.flush()
                for j in range(cols):
                    os.pwrite(f.fileno(), out[j].tobytes(), p.offset + (j * rows + r0) * item)
            else:
                f.seek(p.offset + r0 * _numel(shape[1:]) * item)
                f.write(block.contiguous().numpy().tobytes())
            yield (r1 - r0) * _numel(shape[1:]) * item
        f.seek(p.offset + p.length)

    # ----------------------------------------------------------------------------------------
    def finish(self, proto: onnx.ModelProto, path, *, single_file: bool, check: bool = True,
               progress: Progress = silent) -> Path:
        """Write proto (whose big initializers refer to the data file) to path, full-check it there,
        then either keep the data file (compacted if the graph dropped any of it) or assemble one
        self-contained model file and remove the data file."""
        path = Path(path)
        data_name = path.name + DATA_SUFFIX
        if self.data_path is not None and self.data_path.name != data_name:
            raise RuntimeError(f"weights were written to {self.data_path.name}, the model is {path.name}")  # a bug
        try:
            refs = _external_refs(proto)
            if self.data_path is not None and _wasted(refs, self.data_path):
                _compact(proto, refs, self.data_path, progress)
                self._stop_hasher()  # rewritten: its hash is read whole, if anyone needs it
            if not single_file:  # the layout onnx.save_model(size_threshold=1024) gives: only tiny tensors inline
                _move_inline_to_data(proto, path.with_name(data_name), EXTERNAL_FROM_BYTES)
                refs = _external_refs(proto)
                if self._hasher is not None:  # appended to: the hasher follows to the end
                    self._hasher.follow(self.data_path.stat().st_size)
            onnx.save_model(proto, str(path))
            if check:  # the hasher runs on while the checker reads the graph (hashlib frees the GIL)
                progress("checking", 0, None)
                onnx.checker.check_model(str(path), full_check=True)
                progress("checking", 1, 1)
            if single_file:
                assemble_single_file(path, progress)
            elif self.data_path is not None and not refs:
                self.data_path.unlink()
            elif self._hasher is not None:
                self.data_digest = self._hasher.result()
        finally:
            self._stop_hasher()
        return path

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.result()  # ends its thread
            self._hasher = None


class _FollowingHasher:
    """sha256 of a file being written front to back, read by a thread that follows the writer:
    follow(end) says that bytes [0, end) are final. Hashing the 3.3 GB data file after the export
    cost ~2 s (3% of that export); behind the writer it overlaps with converting the weights."""

    def __init__(self, path: Path):
        self._path, self._queue = path, queue.SimpleQueue()
        self._sha, self._size, self._failed = hashlib.sha256(), 0, False
        self._thread = threading.Thread(target=self._run, name="scan-export-hash", daemon=True)
        self._thread.start()

    def follow(self, end: int) -> None:
        self._queue.put(end)

    def _run(self) -> None:
        try:
            with open(self._path, "rb") as f:
                while (end := self._queue.get()) is not None:
                    while self._size < end:
                        chunk = os.pread(f.fileno(), min(1 << 24, end - self._size), self._size)
                        if not chunk:
                            break
                        self._sha.update(chunk)
                        self._size += len(chunk)
        except OSError:
            self._failed = True
            while self._queue.get() is not None:  # drain until told to stop
                pass

    def result(self) -> tuple[int, str] | None:
        """(bytes hashed, hex digest), or None if reading failed; ends the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return None if self._failed else (self._size, self._sha.hexdigest())


def _is_fake(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(getattr(tensor, "raw", None), FakeTensor)


def _single_transpose(value, graph):
    """The Transpose node that is value's only use, if it swaps the two axes of a 2-D value and
    its output is not a graph output (what the optimizer would fold), else None."""
    uses = list(value.uses())
    if len(uses) != 1 or value.shape is None or len(value.shape) != 2 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.graph is not graph:
        return None
    perm = node.attributes.get("perm")
    if perm is None or tuple(perm.as_ints()) != (1, 0) or node.outputs[0].is_graph_output():
        return None
    return node


def _fold_transpose(graph, value, tensor) -> str:
    """Remove Transpose(value), value's only use; its output becomes an initializer holding tensor
    (the transposed data) under the output's name. Returns that name."""
    import onnx_ir as ir

    node = _single_transpose(value, graph)
    out = node.outputs[0]
    name = out.name
    new = ir.Value(name=None, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    ir.convenience.replace_all_uses_with(out, new)
    graph.remove(node, safe=True)
    graph.initializers.pop(value.name)
    out.name = None
    new.name = name
    graph.register_initializer(new)
    return name
