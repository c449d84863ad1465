"""The example third-party plugin installs with pip and composes by name in a spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_plugin_composes_by_name(tmp_path, make_spec, teacher_dir):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "third_party_plugin"),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))

    def kd(*args):
        return subprocess.run(
            [sys.executable, "-m", "kdcore.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )

    listed = json.loads(kd("plugins", "--json").stdout)["distributions"]
    assert listed["kd-cosine-hint"]["components"]["loss"] == ["cosine_hint"]
    spec = make_spec(
        teachers=[{"path": str(teacher_dir)}],
        losses=[{"name": "ce"}, {"name": "cosine_hint", "weight": 0.5}],
    )
    spec["train"]["steps"] = 3
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert kd("validate", path).returncode == 0
    proc = kd("distill", path, "--output", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r["loss/cosine_hint"] for r in metrics if "loss/cosine_hint" in r]
    assert len(values) == 3 and all(0.0 <= v <= 2.0 for v in values)
    # the plugin's own tests pass against the installed package
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "examples" / "third_party_plugin" / "tests"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
