#!/usr/bin/env bash
# kd distill at a real vocabulary (V = 151,936), from a live teacher and from a top-k cache;
# writes results/results.md with each run's step time and peak memory (~10 minutes, 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
STEPS=${KD_STEPS:-4}
python make_models.py
kd distill spec.toml --set train.steps="$STEPS" --output runs/live
kd cache spec.toml --top-k 64 --output runs/cache
kd distill cached.toml --set train.steps="$STEPS" --output runs/cached
python summarize.py
