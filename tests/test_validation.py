"""Bad input gets a ValueError naming the argument, the expected layout, and what arrived."""

import pytest
import torch

from scan_export import selective_scan_fn
from scan_export.reference import selective_scan_chunked, selective_scan_ref
from scan_export.reference.regimes import make_scan_inputs

IMPLS = [selective_scan_ref, selective_scan_chunked, selective_scan_fn]


def base():
    return make_scan_inputs("easy", 2, 8, 4, 10, 2)


CASES = [
    ("u wrong rank", {"u": torch.randn(2, 8)}, ["u", "rank 3", "(batch, dim, seqlen)", "(2, 8)"]),
    ("delta seqlen mismatch", {"delta": torch.randn(2, 8, 11)}, ["delta", "(2, 8, 10)", "(2, 8, 11)"]),
    ("B seqlen mismatch", {"B": torch.randn(2, 2, 4, 9)}, ["B", "(batch, groups, dstate, seqlen)", "(2, 2, 4, 9)"]),
    ("groups do not divide dim", {"B": torch.randn(2, 3, 4, 10), "C": torch.randn(2, 3, 4, 10)},
     ["B", "3 groups", "dim=8", "(2, 3, 4, 10)"]),
    ("dtype mix", {"delta": torch.randn(2, 8, 10, dtype=torch.float64)}, ["delta", "torch.float32", "torch.float64"]),
    ("complex A", {"A": torch.randn(8, 4, dtype=torch.complex64)}, ["A", "complex"]),
    ("A wrong dim", {"A": torch.randn(7, 4)}, ["A", "(dim, dstate)", "(8, 4)", "(7, 4)"]),
    ("dstate of A and B disagree", {"A": torch.randn(8, 5)}, ["B", "(2, 2, 5, 10)", "(2, 2, 4, 10)"]),
    ("D wrong shape", {"D": torch.randn(7)}, ["D", "(dim,)", "(7,)"]),
    ("initial_state wrong shape", {"initial_state": torch.randn(2, 8, 3)}, ["initial_state", "(2, 8, 4)", "(2, 8, 3)"]),
    ("integer u", {"u": torch.ones(2, 8, 10, dtype=torch.int64)}, ["u", "floating", "torch.int64"]),
    ("empty sequence", {"u": torch.randn(2, 8, 0)}, ["u", "seqlen >= 1"]),
]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case,override,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_named_value_error(impl, case, override, fragments):
    kw = {**base(), **override}
    with pytest.raises(ValueError) as err:
        impl(**kw)
    for fragment in fragments:
        assert fragment in str(err.value), f"{case}: {fragment!r} missing from {err.value}"


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        selective_scan_chunked(**base(), chunk_size=0)
