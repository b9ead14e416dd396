"""Decode steps that keep the state where the model runs.

The plain path feeds numpy arrays and gets numpy arrays back: on CUDA that is a host->device copy
of every state tensor before each token and a device->host copy after it. With IO binding the
state outputs are written into preallocated device buffers, which become the next step's inputs
(two sets, swapped each step); only input_ids go up and the logits row comes down. The same code
runs on CPU (device "cpu"), which is how it is tested here (tests/test_binding.py): it must give
exactly the plain path's tokens.
"""

from __future__ import annotations

import numpy as np

from .contract import LOGITS_TO_KEEP


class PlainDecoder:
    """decoder(tokens: (b,)) -> logits of the next position: (b, V); state kept as numpy arrays."""

    def __init__(self, model, state: list[np.ndarray]):
        self.model, self.state = model, state

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        logits, self.state = self.model.forward(tokens[:, None], self.state)
        return logits[:, -1]


class BoundDecoder:
    """The same contract as PlainDecoder, with the state living on the session's device."""

    def __init__(self, model, state: list[np.ndarray]):
        import onnxruntime as ort

        self.model = model
        self.device = "cuda" if model.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        ortvalue = ort.OrtValue
        self.inputs = [s["name"] for s in model.state_inputs]
        self.outputs = model.state_outputs
        # state: (b, ...) per tensor; shapes stay fixed across decode steps (recurrent states).
        # Copies: on CPU an OrtValue wraps the numpy memory, and the caller's arrays must stay theirs.
        self._host = [np.array(s, order="C", copy=True) for s in state]
        self.current = [ortvalue.ortvalue_from_numpy(s, self.device, 0) for s in self._host]
        self.spare = [ortvalue.ortvalue_from_shape_and_type(list(s.shape), s.dtype, self.device, 0) for s in state]
        self.binding = model.session.io_binding()
        self.keep = np.array(1, np.int64)

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        # Held on self until the run is over: the binding points at this memory, it does not copy it.
        self._ids = np.ascontiguousarray(tokens[:, None], dtype=np.int64)
        b.bind_cpu_input("input_ids", self._ids)
        if self.model.takes_logits_to_keep:
            b.bind_cpu_input(LOGITS_TO_KEEP, self.keep)
        for name, value in zip(self.inputs, self.current):
            b.bind_ortvalue_input(name, value)
        b.bind_output("logits", self.device)  # first: get_outputs() lists outputs in binding order
        for name, value in zip(self.outputs, self.spare):
            b.bind_ortvalue_output(name, value)
        self.model.session.run_with_iobinding(b)
        logits = b.get_outputs()[0].numpy()  # (b, 1, V): the only copy back to the host
        self.current, self.spare = self.spare, self.current
        return logits[:, -1].astype(np.float32, copy=False)

    def state(self) -> list[np.ndarray]:
        """The current state, copied to the host (for inspection and tests; not used per token)."""
        return [v.numpy() for v in self.current]
