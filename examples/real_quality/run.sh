#!/usr/bin/env bash
# Distillation quality on SmolLM2-135M-Instruct (issue 34): one command a table, every row
# a unit that a rerun skips when done and resumes when interrupted (run.py's docstring).
#   bash examples/real_quality/run.sh --table 1 [--rows sft,kd_fkl] [--seeds 0,1,2] [--quick]
#   bash examples/real_quality/run.sh --table 2 [--rows rtn,dwq,kd_fkl,kd_tvd] [--bits 3,4]
#   bash examples/real_quality/run.sh --collect [--quick]
# Everything runs through kd's OpenBLAS fast path (float32 products ~30x faster on a CPU).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -x "$root/.venv/bin/python" ]; then PY=$root/.venv/bin/python; else PY=${PYTHON:-python3}; fi
exec "$PY" -m kdcore.cli.fastpath -- "$PY" "$here/run.py" "$@"
