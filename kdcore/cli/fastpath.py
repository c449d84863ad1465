"""Linux: run MLX with OpenBLAS instead of the reference BLAS its CPU wheel carries.

MLX's Linux wheel links ``libblas.so.3``; preloading Debian's OpenBLAS build of that
library makes matrix products many times faster (``docs/performance.md``, the BLAS section:
``benchmarks/run --only blas``). ``kd`` re-executes itself once with
``LD_PRELOAD`` set when the library exists (set ``KD_NO_FASTPATH=1`` to opt out). This
module is the one place that names the library; for what does not start through ``kd``:

    python -m kdcore.cli.fastpath --path          # print the library (exit 1: none here)
    python -m kdcore.cli.fastpath --coretype      # the OPENBLAS_CORETYPE it sets (exit 1: none)
    python -m kdcore.cli.fastpath -- CMD [ARG...]  # run CMD with it preloaded, if there is one

e.g. ``python -m kdcore.cli.fastpath -- python script.py`` for a script that runs models
itself, or ``-- python -m pytest``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
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
    # NumPy's wheel maps its own libscipy_openblas; only the preloaded library counts, or the
    # libopenblas it pulls in from Debian's own folder for it.
    debian = {str(Path(p).parent) for p in CANDIDATES if p.endswith("/libblas.so.3")}
    return any(lib in CANDIDATES or str(Path(lib).parent) in debian for lib in loaded_blas())


# OpenBLAS kernel families older than AVX2: what its run-time detection falls back to on a
# CPU model it does not know.
GENERIC_CORES = frozenset(
    {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "northwood", "katmai"}
)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def openblas_core(lib: str) -> str | None:
    """The kernel family the OpenBLAS at ``lib`` chose for this CPU, None if unknown."""
    try:
        corename = ctypes.CDLL(lib).openblas_get_corename
    except (OSError, AttributeError):
        return None
    corename.restype = ctypes.c_char_p
    return corename().decode()


def coretype_override(lib: str) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to set for the OpenBLAS at ``lib``, or None.

    OpenBLAS picks its kernels from the CPU model; a model it does not know (a VM's
    "Intel(R) Xeon(R) Processor" with OpenBLAS 0.3.21) gets the SSE3 ``Prescott`` kernels.
    When it chose such a generic family and the CPU's flags allow better, this names the
    best family they allow (``SkylakeX`` for AVX-512, ``Haswell`` for AVX2 + FMA), whose sgemm
    kernels use the wide vector units that the SSE3 ones leave idle. None where its detection
    did well."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        best = "SkylakeX"
    elif {"avx2", "fma"} <= flags:
        best = "Haswell"
    else:
        return None
    core = openblas_core(lib)
    return best if core is not None and core.lower() in GENERIC_CORES else None


def preload_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with OpenBLAS first in ``LD_PRELOAD``
    (and ``OPENBLAS_CORETYPE`` where :func:`coretype_override` names one and the caller set
    none); unchanged off Linux, without the library, with ``KD_NO_FASTPATH=1`` or when it
    is already there."""
    env = dict(os.environ if env is None else env)
    lib = openblas_path()
    if not sys.platform.startswith("linux") or env.get("KD_NO_FASTPATH") == "1" or lib is None:
        return env
    preload = env.get("LD_PRELOAD", "")
    if lib not in preload.split(":"):
        env["LD_PRELOAD"] = ":".join(p for p in (lib, preload) if p)
        if "OPENBLAS_CORETYPE" not in env:
            core = coretype_override(lib)
            if core is not None:
                env["OPENBLAS_CORETYPE"] = core
    return env


def reexec_with_fast_path() -> None:
    """Replace this ``kd`` process with one that preloads OpenBLAS, when that helps."""
    env = preload_env()
    if os.environ.get("_KD_REEXEC") or env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    env["_KD_REEXEC"] = "1"
    # Not ``python -m``: that puts the working directory first on sys.path, and an attrs.py
    # (or a kdcore/ working copy) where the user typed ``kd`` would be imported instead.
    os.execve(sys.executable, [sys.executable, "-c", _ENTRY, *sys.argv[1:]], env)


# ``-c`` puts "" (the working directory) first on sys.path; drop it before importing.
_ENTRY = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "sys.argv[0] = 'kd'; from kdcore.cli.main import main; sys.exit(main())"
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--path"]:
        lib = openblas_path()
        if lib is not None:
            print(lib)
        return 0 if lib is not None else 1
    if args == ["--coretype"]:
        lib = openblas_path()
        core = None if lib is None else coretype_override(lib)
        if core is not None:
            print(core)
        return 0 if core is not None else 1
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0].startswith("-"):
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    os.execvpe(args[0], args, preload_env())


if __name__ == "__main__":
    sys.exit(main())
