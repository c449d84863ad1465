#!/usr/bin/env bash
# Per-row routing on real teachers (issue 35): GSM8K rows to a maths teacher, HH rows to
# SmolLM2-135M-Instruct, against SmolLM2 alone on every row (README.md).
#   bash examples/routing/run.sh [--quick] [--out DIR]
# Runs through kd's OpenBLAS fast path (float32 products ~30x faster on a CPU).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -x "$root/.venv/bin/python" ]; then PY=$root/.venv/bin/python; else PY=${PYTHON:-python3}; fi
exec "$PY" -m kdcore.cli.fastpath -- "$PY" "$here/run.py" "$@"
