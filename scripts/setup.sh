#!/usr/bin/env bash
# Sourced by scripts/demo and scripts/test: make .venv (Python 3.11) with kdcore, every
# plugin under plugins/ and the test tools, and the OpenBLAS fast path where apt-get can
# install it. Safe to run again: an existing .venv is updated, not rebuilt. Each stage is
# announced and pip shows its own progress: the first install takes minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage() { echo "setup: [$1/4] $2"; }
PIP=(.venv/bin/python -m pip install --disable-pip-version-check)

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  stage 1 "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
else
  stage 1 "using the existing .venv"
fi
# setuptools 77 is the first that takes the SPDX license strings of the pyproject files
stage 2 "upgrading pip and setuptools in .venv"
"${PIP[@]}" --upgrade pip "setuptools>=77"
plugins=() names=()
for dir in plugins/*/; do
  # kd-kernels is a C++ build: its own pip call below, whose failure does not stop setup
  [ "$dir" = plugins/kernels/ ] && continue
  plugins+=(-e "$dir"); names+=("$(basename "$dir")")
done
stage 3 "installing kdcore (editable, with its test, mlx-lm and tensorboard extras) and ${#names[@]} plugins: ${names[*]} (a few minutes the first time)"
"${PIP[@]}" -e ".[test,mlx-lm,tensorboard]" "${plugins[@]}"

# kd-kernels: native CPU loss kernels, compiled against the MLX just installed (hence no
# build isolation, and its build requirements cmake and nanobind go into .venv first).
# Rebuilt only when its sources are newer than the module or the module refuses this MLX.
# Optional: without it the losses run on kdcore's pure-MLX rows (slower on a CPU).
kd_kernels_current() {
  local so
  so=$(ls plugins/kernels/kd_kernels/_ext*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && [ -z "$(find plugins/kernels/csrc plugins/kernels/CMakeLists.txt \
    plugins/kernels/setup.py plugins/kernels/pyproject.toml -newer "$so" 2>/dev/null)" ] \
    && .venv/bin/python -c 'import sys, kd_kernels
sys.exit(kd_kernels.unavailable_reason() is not None)' >/dev/null 2>&1
}
if [ -d plugins/kernels ]; then
  if kd_kernels_current; then
    echo "setup: kd-kernels (native CPU loss kernels): up to date"
  else
    if ! command -v c++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "setup: installing g++ with apt-get (kd-kernels is C++)"
      { apt-get install -y -q g++ || { apt-get update -q && apt-get install -y -q g++; }; } \
        >/dev/null 2>&1 || echo "setup: could not install g++ with apt-get"
    fi
    echo "setup: building kd-kernels (native CPU loss kernels, C++: a minute or two)"
    # .venv/bin on PATH: the build runs the cmake that pip installs there
    if PATH="$PWD/.venv/bin:$PATH" "${PIP[@]}" "cmake>=3.25" "nanobind>=3.0.1,<4" \
       && PATH="$PWD/.venv/bin:$PATH" "${PIP[@]}" --no-build-isolation -e plugins/kernels; then
      echo "setup: kd-kernels: built (kd doctor lists the row kernels in use)"
    else
      # an older kd-kernels left installed would fail to load against this MLX
      .venv/bin/python -m pip uninstall -y -q kd-kernels >/dev/null 2>&1 || true
      echo "setup: kd-kernels did NOT build (see pip's output above; it needs a C++20 compiler such as g++ >= 10): the losses run on kdcore's pure-MLX rows, correct but slower on a CPU"
    fi
  fi
fi

# MLX's Linux wheel carries the reference BLAS; Debian's OpenBLAS makes matmuls ~30x faster.
# kdcore.cli.fastpath names the library (`kd` preloads it itself); the preload below is for
# the plain `python` processes of scripts/test and scripts/demo.
stage 4 "the OpenBLAS fast path"
FASTPATH=(.venv/bin/python -m kdcore.cli.fastpath)
if [ "$(uname -s)" = Linux ] && ! "${FASTPATH[@]}" --path >/dev/null && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "setup: installing libopenblas0-pthread with apt-get"
  { apt-get install -y -q libopenblas0-pthread || { apt-get update -q && apt-get install -y -q libopenblas0-pthread; }; } \
    >/dev/null 2>&1 || echo "setup: could not install libopenblas0-pthread with apt-get"
fi
if OPENBLAS=$("${FASTPATH[@]}" --path); then
  # a CPU model OpenBLAS does not know gets its SSE3 kernels; kd names the right family
  if [ -z "${OPENBLAS_CORETYPE:-}" ] && CORE=$("${FASTPATH[@]}" --coretype); then
    export OPENBLAS_CORETYPE="$CORE"
  fi
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi
# Say what is so, not what was tried: ask a process started the way scripts/test starts
# its python whether MLX really runs on OpenBLAS.
if .venv/bin/python -c 'import sys, mlx.core
from kdcore.cli.fastpath import fast_path_active
sys.exit(0 if fast_path_active() else 1)'; then
  echo "setup: OpenBLAS fast path: in use (${OPENBLAS:-$LD_PRELOAD} preloaded for python${OPENBLAS_CORETYPE:+, OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE}; kd preloads it itself)"
elif [ "$(uname -s)" != Linux ]; then
  echo "setup: OpenBLAS fast path: not in use (Linux only; MLX uses Metal or Accelerate here)"
elif [ -n "${OPENBLAS:-}" ]; then
  echo "setup: OpenBLAS fast path: not in use, although $OPENBLAS is installed: MLX runs on its slow bundled BLAS (see kd doctor)"
else
  echo "setup: OpenBLAS fast path: not in use: MLX runs on its slow bundled BLAS, ~30x slower (as root: apt-get install libopenblas0-pthread, then run scripts/setup.sh again)"
fi
export PATH="$PWD/.venv/bin:$PATH"
