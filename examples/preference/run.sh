#!/usr/bin/env bash
# The preference example, one command (36 minutes on 2 CPU cores shared with another run):
#   examples/preference/run.sh
# 1. split the bundled HH harmless pairs into train / tune / held-out (deterministic; safety flags)
# 2. teacher: cross-entropy on the chosen training dialogues, then DPO on the training pairs
#    with the settings that tune.py chose on the tune split (rerun that choice with
#    `python examples/preference/tune.py` after this script, ~30 minutes)
# 3. four students (about 5x smaller) distilled from the DPO teacher, each margin loss at the
#    weight that weights.py chose on the tune split (`python examples/preference/weights.py`
#    after this script, ~36 minutes)
# 4. `kd eval --pairs` on the held-out split; results.json and results.md beside this script
# Needs `kd` and a Python with kdcore and kd-preference-safety installed (KD=..., PYTHON=...).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/out"
KD="${KD:-kd}"
PYTHON="${PYTHON:-python3}"
RUN="nice -n 10"

$RUN "$PYTHON" "$HERE/split.py" "$OUT/data"
RUNS=(teacher-sft teacher-dpo student-kd student-rank student-dpkd student-safety)
SPECS=(teacher_sft teacher_dpo student_kd student_rank student_dpkd student_safety)
for i in "${!RUNS[@]}"; do
  rm -rf "${OUT:?}/${RUNS[$i]}"
  $RUN "$KD" distill "$HERE/${SPECS[$i]}.toml" --output "$OUT/${RUNS[$i]}"
done
mkdir -p "$OUT/eval"
for run in "${RUNS[@]}"; do
  $RUN "$KD" eval "$OUT/$run" --pairs "$OUT/data/heldout.jsonl.gz" --batches 2 --json \
    > "$OUT/eval/$run.json"
done
$RUN "$PYTHON" "$HERE/report.py" "$OUT" "$HERE/results"
