#!/usr/bin/env bash
# The preference teacher at other seeds (after run.sh, which made out/data and seed 0):
#   examples/preference/seeds.sh [SEED ...]      (default 1 2; ~10 minutes a seed on 2 cores)
# Trains the SFT and DPO stages again with each seed and prints both teachers' accuracy on
# the held-out and the tune pairs, so that the seed-0 teacher's figures in results.md and
# tune.md can be read against their spread (out/seedN/eval_heldout.json, eval_tune.json).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/out"
KD="${KD:-kd}"
PYTHON="${PYTHON:-python3}"
SEEDS=("$@")
[ ${#SEEDS[@]} -eq 0 ] && SEEDS=(1 2)
for seed in "${SEEDS[@]}"; do
  sft="$OUT/seed$seed/teacher-sft"
  dpo="$OUT/seed$seed/teacher-dpo"
  rm -rf "$OUT/seed$seed"
  "$KD" distill "$HERE/teacher_sft.toml" --set run.seed="$seed" --output "$sft" > /dev/null
  "$KD" distill "$HERE/teacher_dpo.toml" --set run.seed="$seed" \
    --set teachers.0.path="$sft/student" --output "$dpo" > /dev/null
  for split in heldout tune; do
    "$KD" eval "$dpo" --pairs "$OUT/data/$split.jsonl.gz" --batches 2 --json \
      > "$OUT/seed$seed/eval_$split.json"
    "$PYTHON" - "$OUT/seed$seed/eval_$split.json" "$seed" "$split" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))["preference"]
print(
    f"seed {sys.argv[2]}, {sys.argv[3]}: SFT teacher {p['teacher_accuracy']:.3f} "
    f"({p['teacher_correct']}/{p['pairs']}), DPO teacher {p['student_accuracy']:.3f} "
    f"({p['student_correct']}/{p['pairs']}), reward accuracy {p['reward_accuracy']:.3f}"
)
PY
  done
done
