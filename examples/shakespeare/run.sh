#!/usr/bin/env bash
# What ./scripts/demo runs: distil the bundled teacher (distill.toml: hinton at T = 1), train
# the same student with ce alone for the same steps, print both students' val loss beside
# the teacher's, and the compression, forward speed-up and perplexity ratio (also written to
# results/retention.json). Runs in runs/shakespeare (KD_OUT to change).
#   examples/shakespeare/run.sh [KD_DISTILL_ARG...]   e.g. --set train.steps=20 (a smoke run)
#   examples/shakespeare/run.sh recipes [ARG...]      recipes.py: which loss recipe is best,
#                                                     at three seeds (results/recipes.{json,md})
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" = recipes ]; then
  shift
  exec python "$here/recipes.py" "$@"
fi
out=${KD_OUT:-runs/shakespeare}
rm -rf "$out/hinton" "$out/ce"
kd distill "$here/distill.toml" --output "$out/hinton" "$@"
kd distill "$here/ce.toml" --output "$out/ce" "$@"
# python runs the speed measurement itself, so through kd's OpenBLAS fast path
python -m kdcore.cli.fastpath -- python - "$out" "$here/teacher" "$here/results" <<'PY'
import json, math, sys
from pathlib import Path

out = Path(sys.argv[1])
hinton = json.loads((out / "hinton" / "summary.json").read_text())
ce = json.loads((out / "ce" / "summary.json").read_text())
rows = [
    ("teacher", hinton["teacher_parameters"][0], hinton["eval"]["teacher_val_loss"]),
    ("student, distilled", hinton["student_parameters"], hinton["eval"]["val_loss"]),
    ("student, ce only", ce["student_parameters"], ce["eval"]["val_loss"]),
]
print()
print(f"{'model':<22} {'parameters':>10} {'val loss (nats/byte)':>21}")
for name, params, loss in rows:
    print(f"{name:<22} {params:>10,} {loss:>21.4f}")
gain = ce["eval"]["val_loss"] - hinton["eval"]["val_loss"]
print(f"\ndistillation vs ce alone: {gain:+.4f} nats/byte "
      f"({hinton['steps']} steps each; top-1 agreement with the teacher "
      f"{hinton['eval']['top1_agreement']:.3f})")

from kdcore.analysis.compare import measure_speed

teacher_dir = Path(sys.argv[2])
teacher_tps, student_tps = measure_speed([teacher_dir, out / "hinton"])
retention = {
    "compression": rows[0][1] / rows[1][1],
    "forward_speedup": student_tps / teacher_tps,
    "teacher_tokens_per_s": teacher_tps,
    "student_tokens_per_s": student_tps,
    # per-byte perplexity exp(loss): teacher / student, 1.0 = the student matches the teacher
    "perplexity_ratio": math.exp(rows[0][2] - rows[1][2]),
    "top1_agreement": hinton["eval"]["top1_agreement"],
}
results = Path(sys.argv[3])
results.mkdir(exist_ok=True)
(results / "retention.json").write_text(json.dumps(retention, indent=2) + "\n")
print(f"compression {retention['compression']:.1f}x, forward speed-up "
      f"{retention['forward_speedup']:.1f}x ({student_tps:,.0f} vs {teacher_tps:,.0f} tokens/s), "
      f"teacher/student perplexity {retention['perplexity_ratio']:.3f}")
PY
