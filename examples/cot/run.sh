#!/usr/bin/env bash
# Rationale distillation on a synthetic arithmetic task, end to end, in one command:
#
#   examples/cot/run.sh
#
# (extra arguments go to every `kd distill`, e.g. `examples/cot/run.sh --set train.steps=20`
# for a quick smoke run)
# makes the data, trains the teacher (two stages), samples and filters its rationales (kd generate),
# trains four equal-size students, evaluates them and copies results.{json,md},
# generated.summary.json and wall_seconds.txt to examples/cot/results/.
# Needs kdcore, kd-cot and kd-hinton installed (`kd` and `python` on PATH, or set KD and
# PYTHON). Runs niced; every other file it writes is under examples/cot/out (removed first).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=examples/cot/out
KD=${KD:-kd}
PYTHON=${PYTHON:-python}
NICE="nice -n 10"

START=$(date +%s)
rm -rf "$OUT"
$NICE "$PYTHON" examples/cot/make_data.py "$OUT/data"
$NICE "$KD" distill examples/cot/cot_teacher.toml --output "$OUT/teacher-stage1" "$@"
$NICE "$KD" distill examples/cot/cot_teacher_more.toml --output "$OUT/teacher" "$@"
$NICE "$KD" generate examples/cot/cot_generate.toml
for student in answer_ce answer_hinton cot step_by_step; do
  $NICE "$KD" distill "examples/cot/student_$student.toml" --output "$OUT/$student" "$@"
done
# evaluate.py runs the models itself (greedy decoding), so through kd's OpenBLAS fast path
$NICE "$PYTHON" -m kdcore.cli.fastpath -- "$PYTHON" examples/cot/evaluate.py "$OUT"
echo "examples/cot/run.sh: $(( $(date +%s) - START )) s" | tee "$OUT/wall_seconds.txt"
mkdir -p examples/cot/results
cp "$OUT"/{results.json,results.md,generated.summary.json,wall_seconds.txt} examples/cot/results/
