"""scripts/setup.sh builds kd-kernels in its own pip call, against the environment's MLX,
and carries on (saying so) when the C++ build fails.

setup.sh runs here on a copy of the repository's layout whose ``.venv/bin/python`` is a
stub: it records every call and succeeds, except the kd-kernels build when asked to fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

STUB = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../../calls.log"
case "$*" in
  *"--no-build-isolation -e plugins/kernels"*) [ -n "${FAIL_BUILD:-}" ] && exit 1 ;;
  *"kdcore.cli.fastpath --path"*) echo /usr/lib/libblas.so.3 ;;
  *"import sys, kd_kernels"*) exit 1 ;;  # no module built yet
esac
exit 0
"""


def _setup(tmp_path: Path, fail_build: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("hinton", "kernels"):
        (tmp_path / "plugins" / name).mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB)
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("FAIL_BUILD", "LD_PRELOAD")}
    if fail_build:
        env["FAIL_BUILD"] = "1"
    proc = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return proc, (tmp_path / "calls.log").read_text().splitlines()


def test_kd_kernels_is_built_in_its_own_call_against_the_installed_mlx(tmp_path):
    proc, calls = _setup(tmp_path, fail_build=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    main = [c for c in calls if "-e .[test" in c]
    assert len(main) == 1 and "plugins/hinton/" in main[0]
    assert "plugins/kernels" not in main[0]  # a failed C++ build must not stop the rest
    build = [c for c in calls if "-e plugins/kernels" in c]
    assert build == [
        "-m pip install --disable-pip-version-check --no-build-isolation -e plugins/kernels"
    ]
    assert any("cmake>=3.25" in c and "nanobind>=3.0.1,<4" in c for c in calls)
    assert "setup: kd-kernels: built" in proc.stdout


def test_a_failed_kernel_build_is_reported_and_setup_carries_on(tmp_path):
    proc, calls = _setup(tmp_path, fail_build=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kd-kernels did NOT build" in proc.stdout
    assert "pure-MLX rows" in proc.stdout
    assert any("uninstall -y -q kd-kernels" in c for c in calls)  # no stale plugin left
    assert "setup: [4/4]" in proc.stdout  # the OpenBLAS stage still ran
