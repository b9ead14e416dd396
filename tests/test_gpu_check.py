"""tools/gpu_check.sh, the script for a lent GPU machine, run here as its CPU dry run.

The GPU run cannot happen in CI; the dry run walks every step of the same script (doctor, check in
both scan forms, token equality for the three families, the bench) on the CPU provider, so that a
broken step is found before device time is spent on it. No timings are asserted.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ("providers", "doctor", "check-sequential", "check-chunked", "exports", "tokens-mamba", "tokens-mamba2",
         "tokens-granitemoehybrid", "bench")


def run_check(*args, env=None):
    env = {**os.environ, **(env or {})}
    # The script runs python3 from PATH: make it this interpreter, whatever PATH says.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.slow
def test_dry_run_passes_and_cleans_up(tmp_path):
    proc = run_check("--provider", "cpu", "--quick", env={"TMPDIR": str(tmp_path)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out[out.index("== gpu_check summary: provider cpu, quick"):]
    for step in STEPS:
        assert f"ok    {step} (" in summary, summary
    assert "FAIL" not in summary
    assert summary.rstrip().endswith("gpu_check: PASS")
    for family in ("mamba", "mamba2", "granitemoehybrid"):
        assert f"{family}: 20 greedy tokens identical on cpu and cpu" in out
    # The bench's headline lines are in the summary: the floor and both engines.
    assert "floor" in summary and "torch" in summary and "ort" in summary
    assert not list(tmp_path.glob("gpu_check.*")), "the temp dir must be removed on exit"


def test_failure_exits_nonzero_with_summary(tmp_path):
    # A provider this onnxruntime lacks (the CPU build has no CUDA, or a CUDA build whose libraries
    # are hidden): the first step must fail, and the script must say so and stop.
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the missing-provider failure cannot be provoked")
    proc = run_check("--provider", "cuda", env={"TMPDIR": str(tmp_path)})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "FAIL  providers" in out and out.rstrip().endswith(f"gpu_check: FAIL (exit {proc.returncode})")
    assert "ok    doctor" not in out
    assert not list(tmp_path.glob("gpu_check.*"))


def test_bad_arguments_are_refused():
    proc = run_check("--provider", "rocm")
    assert proc.returncode == 2 and "--provider must be cuda or cpu" in proc.stderr
