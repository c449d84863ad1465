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
