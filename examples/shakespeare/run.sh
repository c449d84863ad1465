#!/usr/bin/env bash
# Distil the bundled teacher with hinton + ce, train the same student with ce alone for the
# same steps, and print both students' val loss beside the teacher's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${KD_OUT:-runs/shakespeare}
rm -rf "$out/hinton" "$out/ce"
kd distill "$here/distill.toml" --output "$out/hinton" "$@"
kd distill "$here/ce.toml" --output "$out/ce" "$@"
python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
hinton = json.loads((out / "hinton" / "summary.json").read_text())
ce = json.loads((out / "ce" / "summary.json").read_text())
rows = [
    ("teacher", hinton["teacher_parameters"][0], hinton["eval"]["teacher_val_loss"]),
    ("student, hinton + ce", hinton["student_parameters"], hinton["eval"]["val_loss"]),
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
PY
