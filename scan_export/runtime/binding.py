"""Decode steps that keep the state where the model runs.

The plain path feeds numpy arrays and gets numpy arrays back: on CUDA that is a host->device copy
of every state tensor before each token and a device->host copy after it. With IO binding the
state outputs are written into preallocated device buffers, which become the next step's inputs
(two sets, swapped each step); only input_ids go up and the logits row comes down. The same code
runs on CPU (device "cpu"), which is how it is tested here (tests/test_binding.py): it must give
exactly the plain path's tokens.

Hybrid exports add tensors that grow by one position per step (KV caches, the attention mask):
those outputs are bound to the device without a preallocated buffer (onnxruntime allocates the
grown tensor there), and the mask, which only the host extends, goes up as a small int64 input.
"""

from __future__ import annotations

import numpy as np

from ..contract import ATTENTION_MASK, LOGITS_TO_KEEP


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
        # Hybrid exports: state ends with the mask over the cached positions (host-side, not a graph state).
        self.mask = np.array(state[-1], np.int64) if model.takes_attention_mask else None
        state = state[:len(self.inputs)]
        # Per tensor: does it grow along the sequence (KV caches)? Those are not preallocated.
        self.growing = [axis is not None for axis in model.seq_axes[:len(self.inputs)]]
        # Copies: on CPU an OrtValue wraps the numpy memory, and the caller's arrays must stay theirs.
        self._host = [np.array(s, order="C", copy=True) for s in state]
        self.current = [ortvalue.ortvalue_from_numpy(s, self.device, 0) for s in self._host]
        self.spare = [None if grows else ortvalue.ortvalue_from_shape_and_type(list(s.shape), s.dtype, self.device, 0)
                      for s, grows in zip(state, self.growing)]
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
        if self.mask is not None:  # the new token is real: one more 1 per row
            self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
            b.bind_cpu_input(ATTENTION_MASK, self.mask)
        for name, value in zip(self.inputs, self.current):
            b.bind_ortvalue_input(name, value)
        b.bind_output("logits", self.device)  # first: get_outputs() lists outputs in binding order
        for name, value in zip(self.outputs, self.spare):
            if value is None:
                b.bind_output(name, self.device)  # grows: onnxruntime allocates it on the device
            else:
                b.bind_ortvalue_output(name, value)
        self.model.session.run_with_iobinding(b)
        outs = b.get_outputs()
        logits = outs[0].numpy()  # (b, 1, V): the only copy back to the host
        self.current, self.spare = ([o if grows else s for o, s, grows in zip(outs[1:], self.spare, self.growing)],
                                    [None if grows else c for c, grows in zip(self.current, self.growing)])
        return logits[:, -1].astype(np.float32, copy=False)

    def state(self) -> list[np.ndarray]:
        """The current state, copied to the host (for inspection and tests; not used per token)."""
        return [v.numpy() for v in self.current] + ([self.mask.copy()] if self.mask is not None else [])
