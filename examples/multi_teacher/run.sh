#!/usr/bin/env bash
# The multi-teacher experiment in one command (docs/multi_teacher.md; about 23 minutes):
#   examples/multi_teacher/run.sh
#   three byte-level teachers, each trained on one domain; six students trained on the
#   mixture of the three domains; per-domain val loss and routing accuracy.
# Writes results/results.json, results/results.md, results/per_domain.png and a routing
# heatmap per adaptive student (results/routing_*.png), and results/run_seconds.txt.
# Needs kdcore and kd-amtml installed.
set -euo pipefail
cd "$(dirname "$0")"
KD="nice -n 10 ${KD:-kd}"
# experiment.py evaluates the models itself, so through kd's OpenBLAS fast path
py=${PYTHON:-python}
PYTHON="nice -n 10 $py -m kdcore.cli.fastpath -- $py"

rm -rf runs
mkdir -p runs results
start=$(date +%s)
for domain in shakespeare gsm8k dialogue; do
  $KD distill teacher.toml --set "data.params.path=data/$domain.txt" \
    --set "run.name=teacher-$domain" --output "runs/teacher-$domain"
done
best=$($PYTHON experiment.py select)
echo "best single teacher on the mixture: $best"
$KD distill student_ce.toml --output runs/student-ce
$KD distill student_single.toml --set "teachers.0.path=runs/teacher-$best/student" \
  --set "teachers.0.label=$best" --output runs/student-single
$KD distill student_mean.toml --output runs/student-mean
$KD distill student_amtml.toml --output runs/student-amtml
$KD distill student_amtml_gate.toml --output runs/student-amtml-gate
$KD distill student_amtml_hint.toml --output runs/student-amtml-hint
$KD amtml-heatmap runs/student-amtml
$PYTHON experiment.py report
total=$(( $(date +%s) - start ))
echo "$total" > results/run_seconds.txt
echo "total: $total s"
