"""Linux: run MLX with OpenBLAS instead of the reference BLAS its CPU wheel carries.

MLX's Linux wheel links ``libblas.so.3``; preloading Debian's OpenBLAS build of that
library makes matrix products ~30x faster here. ``kd`` re-executes itself once with
``LD_PRELOAD`` set when the library exists (set ``KD_NO_FASTPATH=1`` to opt out).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)


def openblas_path() -> str | None:
    return next((p for p in CANDIDATES if Path(p).exists()), None)


def loaded_blas() -> list[str]:
    """BLAS libraries mapped into this process (Linux only)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    libs = {line.split()[-1] for line in maps.splitlines() if "blas" in line.lower()}
    return sorted(lib for lib in libs if lib.startswith("/"))


def fast_path_active() -> bool:
    # NumPy's wheel maps its own libscipy_openblas; only the preloaded libblas counts.
    return any(lib in CANDIDATES or "openblas-pthread" in lib for lib in loaded_blas())


def reexec_with_fast_path() -> None:
    """Replace this process with one that preloads OpenBLAS, when that helps."""
    if not sys.platform.startswith("linux") or os.environ.get("KD_NO_FASTPATH") == "1":
        return
    lib = openblas_path()
    if lib is None or lib in os.environ.get("LD_PRELOAD", "") or os.environ.get("_KD_REEXEC"):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env["_KD_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "kdcore.cli", *sys.argv[1:]], env)
