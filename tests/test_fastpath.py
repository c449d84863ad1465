"""``kd``'s re-execution with OpenBLAS preloaded keeps the working directory off sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_module_in_the_working_directory_does_not_shadow_kdcore(tmp_path):
    marker = tmp_path / "shadowed"
    for name in ("attrs", "kdcore"):
        folder = tmp_path / name if name == "kdcore" else tmp_path
        folder.mkdir(exist_ok=True)
        target = folder / "__init__.py" if name == "kdcore" else folder / f"{name}.py"
        target.write_text(f"open({str(marker)!r}, 'a').write({name!r})\nraise SystemExit(3)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_KD_REEXEC")}
    kd = Path(sys.executable).with_name("kd")
    proc = subprocess.run(
        [str(kd), "components", "--kind", "loss"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert not marker.exists(), f"ran the working directory's {marker.read_text()}.py"
    assert proc.returncode == 0, proc.stderr
    assert "ce" in proc.stdout


def test_openblas_gets_the_kernels_the_cpu_allows_when_its_detection_falls_back(monkeypatch):
    """A CPU model OpenBLAS does not know gets its SSE3 kernels; the fast path then names
    the family the CPU's flags allow, and leaves a good detection or the user's choice."""
    from kdcore.cli import fastpath

    avx512 = {"sse3", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
    cases = [
        (avx512, "Prescott", "SkylakeX"),
        ({"sse3", "avx2", "fma"}, "Prescott", "Haswell"),
        ({"sse3", "avx2", "fma"}, "Nehalem", "Haswell"),
        (avx512, "SkylakeX", None),
        (avx512, "Zen", None),
        ({"sse3"}, "Prescott", None),
        (avx512, None, None),  # not an OpenBLAS (no openblas_get_corename)
    ]
    for flags, core, want in cases:
        monkeypatch.setattr(fastpath, "_cpu_flags", lambda flags=flags: set(flags))
        monkeypatch.setattr(fastpath, "openblas_core", lambda lib, core=core: core)
        assert fastpath.coretype_override("lib") == want, (flags, core)

    monkeypatch.setattr(fastpath, "_cpu_flags", lambda: avx512)
    monkeypatch.setattr(fastpath, "openblas_core", lambda lib: "Prescott")
    monkeypatch.setattr(fastpath, "openblas_path", lambda: "/usr/lib/libblas.so.3")
    monkeypatch.setattr(fastpath.sys, "platform", "linux")
    env = fastpath.preload_env({})
    assert env["LD_PRELOAD"] == "/usr/lib/libblas.so.3" and env["OPENBLAS_CORETYPE"] == "SkylakeX"
    mine = fastpath.preload_env({"OPENBLAS_CORETYPE": "Haswell"})
    assert mine["OPENBLAS_CORETYPE"] == "Haswell"
    assert "OPENBLAS_CORETYPE" not in fastpath.preload_env({"KD_NO_FASTPATH": "1"})


def test_the_openblas_core_is_read_from_the_library_itself():
    from kdcore.cli import fastpath

    lib = fastpath.openblas_path()
    if lib is None:  # no OpenBLAS on this machine: nothing to read, and nothing is claimed
        assert fastpath.openblas_core("/nonexistent/libblas.so.3") is None
        return
    core = fastpath.openblas_core(lib)
    assert isinstance(core, str) and core
