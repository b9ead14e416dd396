#!/usr/bin/env bash
# The checks for a lent GPU machine, as one script of a few minutes (docs/benchmarks.md, "GPU check"):
#   doctor; `check` of a scan op model in both scan forms; greedy tokens on the provider equal to
#   CPU's for a tiny Mamba, Mamba-2 and GraniteMoeHybrid export; the scan bench and a 130m
#   prefill/decode against torch eager on the same device and the weight-streaming floor.
#
#   bash tools/gpu_check.sh [--provider cuda|cpu] [--quick]
#
# --provider cpu is the dry run this CPU machine can do (tests/test_gpu_check.py runs it with
# --quick, which shrinks the benches to tiny shapes: it checks the script, it times nothing).
# Runs from the checkout with PYTHONPATH (no install needed; `python3 -m scan_export.cli` stands in
# for `scan-export`). Exits non-zero on the first failure; prints a summary either way; every file it
# writes lives in one temporary directory, removed on exit.
set -euo pipefail

PROVIDER=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --provider) PROVIDER="${2:?--provider needs cuda or cpu}"; shift 2 ;;
    --provider=*) PROVIDER="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$PROVIDER" in cuda|cpu) ;; *) echo "gpu_check: --provider must be cuda or cpu, got $PROVIDER" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
# Appended, so that a staged onnxruntime-gpu (PYTHONPATH=/tmp/site:...) stays first.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
SE=(python3 -m scan_export.cli)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
SUMMARY=()
T_START=$SECONDS

finish() {
  local rc=$?
  echo
  echo "== gpu_check summary: provider $PROVIDER$([ "$QUICK" = 1 ] && echo ', quick'), $((SECONDS - T_START)) s =="
  if [ ${#SUMMARY[@]} -gt 0 ]; then printf '%s\n' "${SUMMARY[@]}"; fi
  if [ "$rc" = 0 ]; then echo "gpu_check: PASS"; else echo "gpu_check: FAIL (exit $rc)"; fi
  rm -rf "$WORK"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM  # through finish, so that the temp dir goes too

# step NAME COMMAND...: run it, output to the terminal and to $WORK/NAME.log; one summary line.
step() {
  local name=$1 t0=$SECONDS
  shift
  echo
  echo "-- $name"
  # Not under `if`: there bash ignores set -e inside the functions a step runs, even in a subshell.
  set +e
  (set -e; "$@") 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then
    SUMMARY+=("FAIL  $name (exit $rc; log above)")
    return "$rc"
  fi
  SUMMARY+=("ok    $name ($((SECONDS - t0)) s)")
}

if [ "$PROVIDER" = cuda ]; then
  # onnxruntime-gpu's CUDA EP dlopens libcublas/libcudnn, which come from the nvidia-* pip wheels (next
  # to torch), not from the system: make every process of this script find them. preload_dlls() does
  # the same for one process only, and the CLI processes below are many.
  NV_LIBS="$(python3 -c "
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, '**', 'lib*.so*'), recursive=True)})))
")"
  if [ -n "$NV_LIBS" ]; then export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
fi

providers() {
  python3 - "$PROVIDER" <<'EOF'
import sys
import onnxruntime as ort
if hasattr(ort, "preload_dlls") and sys.argv[1] == "cuda":
    ort.preload_dlls()
have = ort.get_available_providers()
print(f"onnxruntime {ort.__version__} from {ort.__file__}; providers {have}")
want = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[sys.argv[1]]
if want not in have:
    sys.exit(f"no {want} in this onnxruntime build")
if sys.argv[1] == "cuda":
    import torch
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
          f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device (torch eager is the bench's reference on the GPU)")
EOF
}

check_form() {
  local form=$1
  "${SE[@]}" scan --out "$WORK/scan-$form.onnx" --scan-form "$form"
  "${SE[@]}" check "$WORK/scan-$form.onnx" --provider "$PROVIDER"
}

# Tiny random checkpoints, exported in one process (each CLI export would import torch again).
make_exports() {
  python3 - "$WORK" <<'EOF'
import sys
from pathlib import Path
from scan_export.onnx.model_export import export_model
from scan_export.tiny import make_tiny_checkpoint
work = Path(sys.argv[1])
for t in ("mamba", "mamba2", "granitemoehybrid"):
    export_model(make_tiny_checkpoint(work / f"ckpt-{t}", t), work / f"export-{t}")
    print(f"exported tiny {t}")
EOF
}

# Greedy tokens on $PROVIDER equal to CPU's, through `generate` (onnxruntime only; no torch).
tokens_equal() {
  local t=$1 n=20
  "${SE[@]}" generate "$WORK/export-$t" --input-ids 5,6,7 --max-new-tokens $n --json --provider "$PROVIDER" \
    > "$WORK/tokens-$t-$PROVIDER.json"
  "${SE[@]}" generate "$WORK/export-$t" --input-ids 5,6,7 --max-new-tokens $n --json --provider cpu \
    > "$WORK/tokens-$t-cpu.json"
  python3 - "$WORK/tokens-$t-$PROVIDER.json" "$WORK/tokens-$t-cpu.json" "$PROVIDER" "$t" $n <<'EOF'
import json, sys
a, b = (json.loads(open(p).read().strip().splitlines()[-1])["tokens"] for p in sys.argv[1:3])
provider, t, n = sys.argv[3], sys.argv[4], int(sys.argv[5])
print(f"{t}: {provider} {a}\n{t}: cpu  {b}")
if len(a) != n or a != b:
    sys.exit(f"{t}: tokens differ or are not {n} long")
print(f"{t}: {n} greedy tokens identical on {provider} and cpu")
EOF
}

bench() {
  python3 tools/gpu_bench.py --provider "$PROVIDER" $([ "$QUICK" = 1 ] && echo --quick) --json "$WORK/bench.json"
}

step providers providers
step doctor "${SE[@]}" doctor --provider "$PROVIDER" $([ "$QUICK" = 1 ] && echo "--tokens 4")
step check-sequential check_form sequential
step check-chunked check_form chunked
step exports make_exports
for t in mamba mamba2 granitemoehybrid; do
  step "tokens-$t" tokens_equal "$t"
done
step bench bench
# The bench's headline numbers, into the summary.
HEADLINE="$(python3 tools/gpu_bench.py --summarize "$WORK/bench.json")"
while IFS= read -r line; do SUMMARY+=("      $line"); done <<< "$HEADLINE"
