#!/usr/bin/env bash
# On-policy distillation (train.on_policy, GKD) against off-policy and sequence-level KD on
# the bundled HH chat data, one command (run.py's docstring says what it trains and measures):
#   examples/on_policy/run.sh            three seeds: results/results.{json,md} (~10-15 minutes
#                                        on two otherwise idle cores)
#   examples/on_policy/run.sh --quick    a smoke run of a few steps (runs/on_policy/quick/)
#   examples/on_policy/run.sh --seeds 0 --out DIR
# python runs the whole example in one process, through kd's OpenBLAS fast path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec python -m kdcore.cli.fastpath -- python "$here/run.py" "$@"
