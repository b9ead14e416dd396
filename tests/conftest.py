import numpy as np
import pytest
import torch

from scan_export.runtime.parity import compare


def to64(kw: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def rel_err(actual, expected) -> float:
    """max |actual − expected| / max |expected|, the parity metric used everywhere (runtime.parity)."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    m = compare("x", a, e)
    assert m.finite, f"non-finite output: {m.line()}"
    return m.rel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
