#!/usr/bin/env bash
# mlx-lm models end to end, offline: train a tiny llama teacher, distil it into a smaller
# llama student with hinton + ce, train LoRA adapters on that student, and generate text
# from both results with mlx_lm.generate; the table also goes to results/results.md.
# Needs the extra: pip install 'kdcore[mlx-lm]'.
#   bash examples/mlx_lm/run.sh                # outputs in runs/mlx_lm (KD_OUT to change)
#   KD_STEPS=20 bash examples/mlx_lm/run.sh    # a quick smoke run
#   bash examples/mlx_lm/run.sh scaling [KD_DISTILL_ARG...]
#       one process vs N processes (ring backend, this machine) on the same global batch:
#       throughput of each, and the largest difference between the two trained students
#       (N = KD_PROCS, default 2; outputs in runs/mlx_lm_scaling; table in results/scaling.md)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

# Print the text on stdin and write it to results/NAME.md (in a code block, after CAPTION).
record() {
  local text
  text=$(cat)
  printf '%s\n' "$text"
  mkdir -p "$here/results"
  printf '%s\n\n```\n%s\n```\n' "$2" "$text" > "$here/results/$1.md"
}

scaling() {
  local out=${KD_OUT:-runs/mlx_lm_scaling} procs=${KD_PROCS:-2}
  rm -rf "$out/one" "$out/many"
  mkdir -p "$out"
  kd distill "$here/scaling.toml" --output "$out/one" "$@"
  mlx.launch -n "$procs" --backend ring -- kd distill "$here/scaling.toml" --output "$out/many" "$@"
  echo
  python - "$out" "$procs" <<'PY' | record scaling "What \`examples/mlx_lm/run.sh scaling\` printed:"
import json, os, sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

out, procs = Path(sys.argv[1]), int(sys.argv[2])
one = json.loads((out / "one" / "summary.json").read_text())
many = json.loads((out / "many" / "summary.json").read_text())
a = load_file(out / "one" / "student" / "model.safetensors")
b = load_file(out / "many" / "student" / "model.safetensors")
diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
print(f"{'processes':>9} {'tokens/s':>10} {'train s':>8} {'val loss':>9}")
for n, s in ((1, one), (procs, many)):
    print(f"{n:>9} {s['tokens_per_s']:>10,.0f} {s['wall_seconds']:>8.1f} {s['eval']['val_loss']:>9.4f}")
print(f"max |parameter difference| after {one['steps']} steps: {diff:.2e}")
PY
}

if [ "${1:-}" = scaling ]; then
  shift
  scaling "$@"
  exit
fi

out=${KD_OUT:-runs/mlx_lm}
mkdir -p "$out"
out=$(cd "$out" && pwd)
steps=()
if [[ -n "${KD_STEPS:-}" ]]; then steps=(--set "train.steps=$KD_STEPS"); fi
rm -rf "$out/teacher" "$out/hinton" "$out/lora"

echo "== 1. teacher: a fresh mlx-lm llama trained with ce"
kd distill "$here/teacher.toml" --output "$out/teacher" "${steps[@]}"

echo "== 2. student: a smaller mlx-lm llama distilled with hinton + ce"
kd distill "$here/hinton.toml" --output "$out/hinton" \
  --set "teachers.0.path=\"$out/teacher/student\"" "${steps[@]}"

echo "== 3. LoRA adapters on the distilled student (its weights frozen)"
kd distill "$here/lora.toml" --output "$out/lora" \
  --set "teachers.0.path=\"$out/teacher/student\"" \
  --set "student.model.params.path=\"$out/hinton/student\"" "${steps[@]}"

# mlx_lm.generate is a plain python process (reference BLAS); nothing here is timed
echo "== 4. mlx_lm.generate on the results"
for model in teacher hinton; do
  echo "-- $model"
  mlx_lm.generate --model "$out/$model/student" --prompt "ROMEO:" --max-tokens 80 \
    --temp 0.7 --seed 0 --ignore-chat-template --verbose False
done
echo "-- hinton student + LoRA adapters"
mlx_lm.generate --model "$out/hinton/student" --adapter-path "$out/lora/student" \
  --prompt "ROMEO:" --max-tokens 80 --temp 0.7 --seed 0 --ignore-chat-template --verbose False

echo
python - "$out" <<'PY' | record results "What \`examples/mlx_lm/run.sh\` printed (val loss in nats per byte):"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for name in ("teacher", "hinton", "lora"):
    s = json.loads((out / name / "summary.json").read_text())
    rows.append((name, s["student_parameters"], s["trainable_parameters"], s["steps"],
                 s["eval"]["val_loss"], s["wall_seconds"]))
print(f"{'run':<8} {'parameters':>10} {'trained':>8} {'steps':>5} {'val loss':>9} {'seconds':>8}")
for name, params, trained, steps, loss, sec in rows:
    print(f"{name:<8} {params:>10,} {trained:>8,} {steps:>5} {loss:>9.4f} {sec:>8.1f}")
PY
