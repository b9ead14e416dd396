"""`scan-export check`: run an exported op model against the float64 sequential reference.

This module, like `verify`, is where torch and onnxruntime meet; deployments never import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .errors import ScanExportError
from .onnx.scan_model import ScanModelSpec, read_scan_spec
from .reference import selective_scan_ref
from .reference.regimes import REGIMES, make_scan_inputs
from .runtime import compare_outputs, make_session, run_on_device

# (batch, seqlen) pairs, none of them an export shape: l = 1, ragged around the chunk size, long.
DEFAULT_CASES = ((1, 1), (3, 17), (1, 64), (3, 65), (2, 1000), (1, 4096))
# Relative error (max|err| / max|ref|) allowed per output against the float64 sequential oracle, by
# the model's I/O dtype.
DEFAULT_RTOL = {
    # ~1e-7 is typical (see README); 1e-5 leaves room for long sequences and heavy decays without
    # hiding a real formulation error (those give >1e-3 or NaN).
    "float32": 1e-5,
    # Computed in float32, `out` cast to float16 once at the end: that cast alone is up to half an ulp,
    # 2^-11 ≈ 4.9e-4 of the largest |out|; 1e-3 is twice that. last_state stays float32.
    "float16": 1e-3,
    # float64 throughout: only summation order differs from the oracle (README: ≤ 1e-12).
    "float64": 1e-12,
}
@dataclass(frozen=True)
class CheckRow:
    regime: str
    batch: int
    seqlen: int
    out_rel: float
    state_rel: float
    finite: bool
    passed: bool
    rtol: float


def scan_case_inputs(spec: ScanModelSpec, regime: str, batch: int, seqlen: int, seed: int = 0,
                     input_dtypes: dict | None = None):
    """(feeds for the model, float64 kwargs for the reference) for one case.

    input_dtypes: input name -> numpy dtype the model declares (check passes the graph's; a float16
    model takes A, D, delta_bias, initial_state in float32). None: every input in spec.dtype. The
    reference gets exactly the values fed, widened to float64."""
    dim = spec.dim or 8 * spec.groups
    dstate = spec.dstate or 8
    kw = make_scan_inputs(
        regime, batch, dim, dstate, seqlen, spec.groups, with_D=spec.with_D, with_z=spec.with_z,
        with_delta_bias=spec.with_delta_bias, with_initial_state=spec.with_initial_state,
        delta_softplus=spec.delta_softplus, seed=seed, dtype=torch.float64,
    )
    dtypes = input_dtypes or {}
    feeds = {k: v.numpy().astype(dtypes.get(k, spec.dtype)) for k, v in kw.items() if isinstance(v, torch.Tensor)}
    ref_kw = {k: (torch.from_numpy(feeds[k].astype(np.float64)) if k in feeds else v) for k, v in kw.items()}
    return feeds, ref_kw


def load_op_model(path) -> tuple[ScanModelSpec, dict]:
    """(spec, input name -> declared numpy dtype) of an op model file; a user's bad file is a ScanExportError."""
    path = Path(path)
    if not path.is_file():
        raise ScanExportError(f"model {str(path)!r}: expected an ONNX op model file, got "
                              f"{'a directory' if path.is_dir() else 'no such file'}")
    if path.stat().st_size == 0:
        raise ScanExportError(f"model {str(path)!r}: expected an ONNX op model file, got an empty file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file, or a truncated one
        raise ScanExportError(f"model {str(path)!r}: expected an ONNX op model file, got bytes onnx cannot "
                              f"parse ({type(e).__name__})") from None
    try:
        spec = read_scan_spec(model)
    except ValueError as e:
        raise ScanExportError(f"model {str(path)!r}: {e} (write one with `scan-export scan`)") from None
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return spec, dtypes


def check_scan_model(path, provider: str = "cpu", cases=DEFAULT_CASES, regimes=REGIMES,
                     rtol: float | None = None, seed: int = 0) -> list[CheckRow]:
    """rtol: None for DEFAULT_RTOL of the model's dtype."""
    spec, dtypes = load_op_model(path)
    rtol = DEFAULT_RTOL[spec.dtype] if rtol is None else rtol
    session = make_session(Path(path), provider)
    rows = []
    for regime in regimes:
        for batch, seqlen in cases:
            feeds, ref_kw = scan_case_inputs(spec, regime, batch, seqlen, seed, dtypes)
            out, last_state = run_on_device(session, feeds, ["out", "last_state"])
            ref_out, ref_state = selective_scan_ref(**ref_kw, return_last_state=True)
            report = compare_outputs(
                {"out": out, "last_state": last_state},
                {"out": ref_out.numpy(), "last_state": ref_state.numpy()},
            )
            o, s = report.outputs
            finite = o.finite and s.finite
            rows.append(CheckRow(regime, batch, seqlen, o.rel, s.rel, finite,
                                 finite and report.worst_rel <= rtol, rtol))
    return rows


def format_rows(rows: list[CheckRow], rtol: float | None = None) -> str:
    """rtol: only for the header of an empty table; each row carries the bar it was judged by."""
    lines = [f"{'regime':<7} {'batch':>5} {'seqlen':>6} {'out rel':>10} {'state rel':>10} {'finite':>6}  result",
             "-" * 60]
    for r in rows:
        lines.append(
            f"{r.regime:<7} {r.batch:>5} {r.seqlen:>6} {r.out_rel:>10.2e} {r.state_rel:>10.2e} "
            f"{str(r.finite):>6}  {'ok' if r.passed else f'FAIL (rtol {r.rtol:g})'}"
        )
    worst = max((max(r.out_rel, r.state_rel) for r in rows), default=0.0)
    bar = rows[0].rtol if rows else rtol
    lines.append(f"worst relative error {worst:.2e} against a float64 sequential reference (rtol {bar:g}); "
                 f"{sum(r.passed for r in rows)}/{len(rows)} cases pass")
    return "\n".join(lines)
