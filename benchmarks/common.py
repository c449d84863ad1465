"""Helpers shared by the benchmark scripts: timing, subprocess isolation, machine facts."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kdcore.cli.fastpath import openblas_path


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_isolated(
    module: str,
    args: list[str],
    fast_path: bool | None = None,
    expect_json: bool = True,
    env: dict[str, str] | None = None,
    may_fail: bool = False,
) -> dict:
    """Run ``python -m benchmarks.MODULE ARGS`` in a fresh process (clean peak memory),
    with ``env`` added to the environment, and return the JSON it prints on its last line.

    ``fast_path``: True preloads OpenBLAS (kd's fast path), False runs without it, None
    inherits. A PyTorch peer runs with False, as a user runs it: OpenBLAS preloaded under
    PyTorch's OpenMP threads made SmolLM2's forward 7x slower on this machine (2.7 s ->
    18 s), its spinning threads taking the cores from PyTorch's own. ``may_fail``: a
    failed run returns ``{"skipped": why}`` instead of raising (a peer that runs out of
    memory must not take the section with it)."""
    env, lib = {**os.environ, **(env or {})}, openblas_path()
    if fast_path is True and lib is not None:
        env["LD_PRELOAD"] = lib
    elif fast_path is False:
        env.pop("LD_PRELOAD", None)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and may_fail:  # a peer that cannot run here: say why, go on
        why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else "failed"
        return {"skipped": f"{why}, exit {proc.returncode}: {proc.stderr[-300:].strip()}"}
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.{module} {args} failed:\n{proc.stderr[-3000:]}")
    if not expect_json:
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import platform

    import mlx.core as mx

    from kdcore.cli import fastpath

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "fast_path_active": fastpath.fast_path_active(),
    }
