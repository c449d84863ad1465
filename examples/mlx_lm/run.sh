#!/usr/bin/env bash
# mlx-lm models end to end, offline: train a tiny llama teacher, distil it into a smaller
# llama student with hinton + ce, train LoRA adapters on that student, and generate text
# from both results with mlx_lm.generate. Needs the extra: pip install 'kdcore[mlx-lm]'.
#   bash examples/mlx_lm/run.sh                # outputs in runs/mlx_lm (KD_OUT to change)
#   KD_STEPS=20 bash examples/mlx_lm/run.sh    # a quick smoke run
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
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

echo "== 4. mlx_lm.generate on the results"
for model in teacher hinton; do
  echo "-- $model"
  mlx_lm.generate --model "$out/$model/student" --prompt "ROMEO:" --max-tokens 80 \
    --temp 0.7 --seed 0 --ignore-chat-template --verbose False
done
echo "-- hinton student + LoRA adapters"
mlx_lm.generate --model "$out/hinton/student" --adapter-path "$out/lora/student" \
  --prompt "ROMEO:" --max-tokens 80 --temp 0.7 --seed 0 --ignore-chat-template --verbose False

python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for name in ("teacher", "hinton", "lora"):
    s = json.loads((out / name / "summary.json").read_text())
    rows.append((name, s["student_parameters"], s["trainable_parameters"], s["steps"],
                 s["eval"]["val_loss"], s["wall_seconds"]))
print()
print(f"{'run':<8} {'parameters':>10} {'trained':>8} {'steps':>5} {'val loss':>9} {'seconds':>8}")
for name, params, trained, steps, loss, sec in rows:
    print(f"{name:<8} {params:>10,} {trained:>8,} {steps:>5} {loss:>9.4f} {sec:>8.1f}")
PY
