#!/usr/bin/env bash
# A model distilled into its own low-bit version, side by side with mlx-lm's DWQ, offline:
# train a small mlx-lm llama, then at 3 and 4 bits compare round-to-nearest (mlx_lm convert
# -q), mlx_lm dwq and kdcore's `quantize` student (hinton at T = 1, and tvd) on the same
# held-out bytes; writes results.json and the table in README.md (see run.py).
# Needs the extra: pip install 'kdcore[mlx-lm]'.
#   bash examples/quantize/run.sh                              # outputs in runs/quantize
#   KD_STEPS=4 KD_TEACHER_STEPS=20 bash examples/quantize/run.sh   # a quick smoke run
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
# the OpenBLAS fast path that `kd` uses, for this process and every one it starts
exec "$PY" -m kdcore.cli.fastpath -- "$PY" "$here/run.py" "$@"
