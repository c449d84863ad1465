#!/usr/bin/env bash
# One process vs N processes (ring backend, this machine) on the same global batch:
# throughput of each, and the largest difference between the two trained students.
#   bash examples/mlx_lm/scaling.sh            # N = 2, outputs in runs/mlx_lm_scaling
#   KD_PROCS=4 bash examples/mlx_lm/scaling.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${KD_OUT:-runs/mlx_lm_scaling}
procs=${KD_PROCS:-2}
rm -rf "$out/one" "$out/many"
mkdir -p "$out"
kd distill "$here/scaling.toml" --output "$out/one" "$@"
mlx.launch -n "$procs" --backend ring -- kd distill "$here/scaling.toml" --output "$out/many" "$@"
python - "$out" "$procs" <<'PY'
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
print(f"\ncores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
print(f"{'processes':>9} {'tokens/s':>10} {'train s':>8} {'val loss':>9}")
for n, s in ((1, one), (procs, many)):
    print(f"{n:>9} {s['tokens_per_s']:>10,.0f} {s['wall_seconds']:>8.1f} {s['eval']['val_loss']:>9.4f}")
print(f"max |parameter difference| after {one['steps']} steps: {diff:.2e}")
PY
