#!/usr/bin/env bash
# The preference example, one command (about 24 minutes on two otherwise idle cores,
# docs/preference.md); every file it writes is under out/, its results under results/:
#   examples/preference/run.sh                  the example (1-4 below): results/results.{json,md}
#   examples/preference/run.sh tune             re-choose the DPO settings on the tune split
#                                               (tune.py: results/tune.{json,md})
#   examples/preference/run.sh weights [ARG...] re-choose the margin-loss weights on the tune
#                                               split (weights.py ARG...: results/weights.{json,md})
#   examples/preference/run.sh seeds [SEED...]  the teacher at other seeds (default 1 2;
#                                               ~10 minutes a seed on 2 cores)
# The last three read the first one's out/.
# 1. split the bundled HH harmless pairs into train / tune / held-out (deterministic; safety flags)
# 2. teacher: cross-entropy on the chosen training dialogues, then DPO on the training pairs
#    with the settings that tune.py chose on the tune split
# 3. four students (about 5x smaller) distilled from the DPO teacher, each margin loss at the
#    weight that weights.py chose on the tune split
# 4. `kd eval --pairs` on the held-out split; results/results.json and results/results.md
# Needs `kd` and a Python with kdcore and kd-preference-safety installed (KD=..., PYTHON=...).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/out"
KD="${KD:-kd}"
PYTHON="${PYTHON:-python3}"
RUN="nice -n 10"

# The SFT and DPO stages again with each seed; both teachers' accuracy on the held-out and
# the tune pairs, so that the seed-0 teacher's figures in results/results.md and
# results/tune.md can be read against their spread (out/seedN/eval_heldout.json, eval_tune.json).
seeds() {
  local seeds=("$@") seed sft dpo split
  [ ${#seeds[@]} -eq 0 ] && seeds=(1 2)
  for seed in "${seeds[@]}"; do
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
}

case "${1:-}" in
  tune) shift; exec $RUN "$PYTHON" "$HERE/tune.py" "$@" ;;
  weights) shift; exec $RUN "$PYTHON" "$HERE/weights.py" "$@" ;;
  seeds) shift; seeds "$@"; exit ;;
  "") ;;
  *) echo "usage: $0 [tune | weights [ARG...] | seeds [SEED...]]" >&2; exit 2 ;;
esac

$RUN "$PYTHON" "$HERE/split.py" "$OUT/data"
RUNS=(teacher-sft teacher-dpo student-kd student-rank student-dpkd student-safety)
SPECS=(teacher_sft teacher_dpo student_kd student_rank student_dpkd student_safety)
for i in "${!RUNS[@]}"; do
  rm -rf "${OUT:?}/${RUNS[$i]}"
  $RUN "$KD" distill "$HERE/${SPECS[$i]}.toml" --output "$OUT/${RUNS[$i]}"
done
mkdir -p "$OUT/eval" "$HERE/results"
for run in "${RUNS[@]}"; do
  $RUN "$KD" eval "$OUT/$run" --pairs "$OUT/data/heldout.jsonl.gz" --batches 2 --json \
    > "$OUT/eval/$run.json"
done
$RUN "$PYTHON" "$HERE/report.py" "$OUT" "$HERE/results/results"
