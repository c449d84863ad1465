#!/usr/bin/env bash
# Sourced by scripts/demo and scripts/test: make .venv (Python 3.11) with kdcore, every
# plugin under plugins/ and the test tools, and the OpenBLAS fast path where apt-get can
# install it. Safe to run again: an existing .venv is updated, not rebuilt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip "setuptools>=70.1"
plugins=()
for dir in plugins/*/; do plugins+=(-e "$dir"); done
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,mlx-lm,tensorboard]" "${plugins[@]}"

# MLX's Linux wheel carries the reference BLAS; Debian's OpenBLAS makes matmuls ~30x faster.
# kdcore.cli.fastpath names the library (`kd` preloads it itself); the preload below is for
# the plain `python` processes of scripts/test and scripts/demo.
FASTPATH=(.venv/bin/python -m kdcore.cli.fastpath)
if [ "$(uname -s)" = Linux ] && ! "${FASTPATH[@]}" --path >/dev/null && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q libopenblas0-pthread || { apt-get update -q && apt-get install -y -q libopenblas0-pthread; }; } \
    >/dev/null 2>&1 || echo "note: could not install libopenblas0-pthread; MLX will use its slow bundled BLAS"
fi
if OPENBLAS=$("${FASTPATH[@]}" --path); then
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi
export PATH="$PWD/.venv/bin:$PATH"
