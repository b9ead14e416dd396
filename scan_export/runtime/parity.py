"""Compare outputs: max abs error, error relative to the reference's magnitude, and the worst index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OutputMismatch:
    name: str
    max_abs: float
    rel: float  # max |actual − expected| / max |expected|
    worst_index: tuple[int, ...]
    actual: float
    expected: float
    finite: bool

    def line(self) -> str:
        return (
            f"{self.name}: max_abs={self.max_abs:.3e} rel={self.rel:.3e} at {self.worst_index} "
            f"(got {self.actual:.6g}, want {self.expected:.6g}){'' if self.finite else ' NON-FINITE'}"
        )


class ParityError(AssertionError):
    """One or more outputs exceeded their tolerance; the message lists every offending output."""

    def __init__(self, failures: list[OutputMismatch], rtol: float):
        self.failures = failures
        super().__init__(f"{len(failures)} output(s) over rel tolerance {rtol:g}:\n" + "\n".join(f.line() for f in failures))


def compare(name: str, actual, expected) -> OutputMismatch:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"{name}: shape {actual.shape} does not match the reference's {expected.shape}")
    finite = bool(np.isfinite(actual).all())
    diff = np.abs(actual - expected)
    diff = np.where(np.isnan(diff), np.inf, diff)  # a NaN is the worst possible error
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    return OutputMismatch(
        name, max_abs, rel, tuple(int(i) for i in worst),
        float(actual[worst]) if diff.size else 0.0, float(expected[worst]) if diff.size else 0.0, finite,
    )


@dataclass(frozen=True)
class ParityReport:
    outputs: list[OutputMismatch]

    @property
    def worst_rel(self) -> float:
        return max((o.rel for o in self.outputs), default=0.0)

    def check(self, rtol: float) -> ParityReport:
        failures = [o for o in self.outputs if not o.finite or not o.rel <= rtol]
        if failures:
            raise ParityError(failures, rtol)
        return self


def compare_outputs(actual: dict, expected: dict) -> ParityReport:
    """actual, expected: name -> array. Every expected name must be present in actual."""
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise ValueError(f"outputs missing from the run: {missing}")
    return ParityReport([compare(k, actual[k], expected[k]) for k in expected])
