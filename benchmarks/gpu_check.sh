#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py: its docstring says what it does and how to fill wheels/) on a machine with a
# CUDA device, from the repository's root, in at most 8 minutes:
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--steps a,b] [--dry-run] ...   # arguments go to gpu_check.py
#
# PYTHON picks the interpreter (default python3, the one that holds torch). When $OUT is set (the device tool's
# folder of files that come back) and no --out is given, the results and the log (gpu-check.log) are written there.
# The exit status is gpu_check.py's: 0 when no step failed, 1 when one did, 2 for a bad call or no CUDA device.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
args=("$@")
out="${OUT:-}"
for a in "$@"; do
    case "$a" in --out|--out=*) out="" ;; esac
done
if [[ -n "$out" ]]; then
    mkdir -p "$out"
    "$py" -m benchmarks.gpu_check "${args[@]}" --out "$out" 2>&1 | tee "$out/gpu-check.log"
    exit "${PIPESTATUS[0]}"
fi
exec "$py" -m benchmarks.gpu_check "${args[@]}"
