#!/usr/bin/env bash
# A served teacher checked against real third-party servers (issue 35): llama-cpp-python's
# llama_cpp.server (from its own venv, --venv or $KD_LLAMACPP_VENV, default
# /tmp/llamacpp-venv) and, with --mlx, mlx_lm.server, against kdcore's float32 import of
# the same GGUF (README.md).
#   bash examples/served/verify.sh [--mlx] [--venv DIR] [--rows N] [--skip-distill]
# or any running OpenAI-style server serving that import (vLLM: vllm_cpu.sh):
#   bash examples/served/verify.sh --url http://127.0.0.1:8795 --model smollm2 \
#     [--form echo] [--form prompt_logprobs] [--out examples/served/results/vllm_cpu.json]
# Runs niced, through kd's OpenBLAS fast path (float32 products ~30x faster on a CPU).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -x "$root/.venv/bin/python" ]; then PY=$root/.venv/bin/python; else PY=${PYTHON:-python3}; fi
exec nice -n 19 "$PY" -m kdcore.cli.fastpath -- "$PY" "$here/verify.py" "$@"
