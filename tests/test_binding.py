"""IO-binding decode (state kept on the device, runtime/binding.py) gives exactly the plain path's
tokens and state. The same code runs on CUDA; here it runs with device "cpu"."""

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the exports come from tiny transformers checkpoints")

from scan_export.onnx.model_export import export_model  # noqa: E402
from scan_export.runtime.binding import BoundDecoder, PlainDecoder  # noqa: E402
from scan_export.runtime.generate import ExportedModel, Sampling, generate  # noqa: E402
from scan_export.tiny import make_tiny_checkpoint  # noqa: E402

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [42]]


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def export_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return export_model(make_tiny_checkpoint(root / "ckpt", request.param), root / "export")


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(do_sample=True, top_k=20, seed=4)], ids=["greedy", "sampled"])
def test_bound_generation_equals_plain(export_dir, sampling):
    plain, bound = ExportedModel(export_dir), ExportedModel(export_dir, io_binding=True)
    assert not plain.io_binding and bound.io_binding
    want = generate(plain, PROMPTS, 24, sampling=sampling)
    assert generate(bound, PROMPTS, 24, sampling=sampling) == want
    assert all(len(set(row)) > 3 for row in want)  # a varied model, or the comparison proves little


def test_bound_state_equals_plain_state_step_by_step(export_dir):
    """Same kernels, same inputs: the state after 10 steps is bit-identical, so the buffers are swapped
    correctly (an output bound to the buffer it reads from would corrupt it)."""
    model = ExportedModel(export_dir)
    ids = np.array([[3, 1, 4], [1, 5, 9]])
    logits, state = model.forward(ids, model.zero_state(2), logits_to_keep=1)
    plain, bound = PlainDecoder(model, state), BoundDecoder(model, state)
    tokens = logits[:, -1].argmax(-1)
    for _ in range(10):
        a, b = plain(tokens), bound(tokens)
        np.testing.assert_array_equal(a, b)
        tokens = a.argmax(-1)
    for p, q in zip(plain.state, bound.state()):
        np.testing.assert_array_equal(p, q)
