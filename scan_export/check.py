"""`scan-export check`: run an exported op model against the float64 sequential reference.

This module, like `verify`, is where torch and onnxruntime meet; deployments never import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from .errors import ScanExportError
from .onnx.scan_model import ScanModelSpec, read_scan_spec
from .reference import selective_scan_ref
from .reference.regimes import REGIMES, make_scan_inputs
from .runtime import compare_outputs, make_session, run_on_device

# (batch, seqlen) pairs, none of them an export shape: l = 1, ragged around the chunk size, long.
DEFAULT_CASES = ((1, 1), (3, 17), (1, 64), (3, 65), (2, 1000), (1, 4096))
# float32 graph against a float64 oracle: ~1e-7 is typical (see README); 1e-5 leaves room for
# long sequences and heavy decays without hiding a real formulation error (those give >1e-3 or NaN).
DEFAULT_RTOL = 1e-5


@dataclass(frozen=True)
class CheckRow:
    regime: str
    batch: int
    seqlen: int
    out_rel: float
    state_rel: float
    finite: bool
    passed: bool


def scan_case_inputs(spec: ScanModelSpec, regime: str, batch: int, seqlen: int, seed: int = 0):
    """(feeds for the model, float64 kwargs for the reference) for one case."""
    dim = spec.dim or 8 * spec.groups
    dstate = spec.dstate or 8
    kw = make_scan_inputs(
        regime, batch, dim, dstate, seqlen, spec.groups, with_D=spec.with_D, with_z=spec.with_z,
        with_delta_bias=spec.with_delta_bias, with_initial_state=spec.with_initial_state,
        delta_softplus=spec.delta_softplus, seed=seed, dtype=getattr(torch, spec.dtype),
    )
    feeds = {k: v.numpy() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return feeds, ref_kw


def check_scan_model(path, provider: str = "cpu", cases=DEFAULT_CASES, regimes=REGIMES,
                     rtol: float = DEFAULT_RTOL, seed: int = 0) -> list[CheckRow]:
    if not Path(path).is_file():
        raise ScanExportError(f"{path}: no such file; expected an op model written by `scan-export scan`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends: not an ONNX file
        raise ScanExportError(f"{path}: expected an ONNX model, could not parse it ({type(e).__name__})") from None
    spec = read_scan_spec(model)
    session = make_session(Path(path), provider)
    rows = []
    for regime in regimes:
        for batch, seqlen in cases:
            feeds, ref_kw = scan_case_inputs(spec, regime, batch, seqlen, seed)
            out, last_state = run_on_device(session, feeds, ["out", "last_state"])
            ref_out, ref_state = selective_scan_ref(**ref_kw, return_last_state=True)
            report = compare_outputs(
                {"out": out, "last_state": last_state},
                {"out": ref_out.numpy(), "last_state": ref_state.numpy()},
            )
            o, s = report.outputs
            finite = o.finite and s.finite
            rows.append(CheckRow(regime, batch, seqlen, o.rel, s.rel, finite, finite and report.worst_rel <= rtol))
    return rows


def format_rows(rows: list[CheckRow], rtol: float = DEFAULT_RTOL) -> str:
    lines = [f"{'regime':<7} {'batch':>5} {'seqlen':>6} {'out rel':>10} {'state rel':>10} {'finite':>6}  result",
             "-" * 60]
    for r in rows:
        lines.append(
            f"{r.regime:<7} {r.batch:>5} {r.seqlen:>6} {r.out_rel:>10.2e} {r.state_rel:>10.2e} "
            f"{str(r.finite):>6}  {'ok' if r.passed else f'FAIL (rtol {rtol:g})'}"
        )
    worst = max((max(r.out_rel, r.state_rel) for r in rows), default=0.0)
    lines.append(f"worst relative error {worst:.2e} against a float64 sequential reference; "
                 f"{sum(r.passed for r in rows)}/{len(rows)} cases pass")
    return "\n".join(lines)
