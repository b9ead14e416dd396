#!/usr/bin/env bash
# Run the suite against the newest releases of every dependency (torch excepted: 2.13.0 is the CPU
# wheel), in a throwaway venv, so that upstream drift is found on purpose and not by a red main.
#   bash tools/test_newest.sh [--freeze] [pytest args...]
# --freeze: when the suite passes, rewrite constraints.txt with the versions it passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
freeze=0
if [[ "${1:-}" == "--freeze" ]]; then freeze=1; shift; fi
venv="${SCAN_EXPORT_NEWEST_VENV:-${TMPDIR:-/tmp}/scan-export-newest}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e ".[test]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|onnx|onnxruntime|onnxscript|onnx-ir|onnxruntime-genai|tokenizers|safetensors|huggingface.hub) '
"$venv/bin/python" -m pytest -q -n 2 --dist loadfile "$@"
if (( freeze )); then
  "$venv/bin/python" tools/freeze_constraints.py --write constraints.txt
  echo "constraints.txt rewritten from $venv; review with git diff"
fi
