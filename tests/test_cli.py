"""The kd command surface, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore import testing

ROOT = Path(__file__).resolve().parents[1]


def kd(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "kdcore.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_components_and_explain():
    proc = kd("components", "--kind", "scheduler", "--json")
    names = {row["name"] for row in json.loads(proc.stdout)}
    assert {"constant", "linear", "cosine", "exponential", "step"} <= names
    proc = kd("explain", "cosine", "--json")
    info = json.loads(proc.stdout)
    assert info["kind"] == "scheduler"
    assert {p["name"] for p in info["parameters"]} >= {"start", "end", "warmup"}
    proc = kd("explain", "cosin")
    assert proc.returncode == 2 and "did you mean 'cosine'" in proc.stderr


def test_doctor_reports_mlx_and_blas():
    info = json.loads(kd("doctor", "--json").stdout)
    assert info["mlx"]
    assert "cpu" in info["device"].lower() or info["metal"] or info["cuda"]
    assert "kdcore" in info["plugins"]
    # the fast-path flag agrees with the BLAS libraries the process really has loaded
    assert info["fast_path_active"] == any("openblas" in path for path in info["blas_loaded"])


def test_data_inspect_a_file_and_a_spec(tmp_path, corpus, make_spec):
    report = json.loads(kd("data", "inspect", corpus, "--json").stdout)
    assert report["format"] == "text" and report["examples"]["train"] > 0
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(make_spec()))
    report = json.loads(kd("data", "inspect", spec, "--json").stdout)
    assert report["samples"][0]["loss_tokens"] == 32


def test_distill_eval_report_end_to_end(tmp_path, make_spec, teacher_dir):
    spec = tmp_path / "spec.json"
    data = make_spec(teachers=[{"path": str(teacher_dir)}])
    spec.write_text(json.dumps(data))
    proc = kd("distill", spec, "--output", tmp_path / "run", "--set", "train.steps=4")
    assert proc.returncode == 0, proc.stderr
    assert "val loss" in proc.stdout
    # not a tty: plain progress lines
    assert "step 4/4" in proc.stderr
    report = json.loads(kd("eval", tmp_path / "run", "--json", "--batches", "2").stdout)
    for key in (
        "val_loss",
        "teacher_val_loss",
        "tokens",
        "kl_teacher_student",
        "js",
        "top1_agreement",
        "top5_overlap",
        "quality_retention",
        "compression_ratio",
        "speedup",
    ):
        assert key in report, key
    assert report["compression_ratio"] > 1
    assert 0 <= report["top1_agreement"] <= 1 and report["js"] >= 0
    assert report["quality_retention"] == pytest.approx(
        report["teacher_val_ppl"] / report["val_ppl"]
    )
    proc = kd("report", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "run" / "report.md").read_text()
    assert "![losses](report/losses.png)" in md
    png = tmp_path / "run" / "report" / "losses.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_kd_eval_prints_the_figures_of_the_runs_own_eval(tmp_path, make_spec, teacher_dir):
    """One evaluation: ``kd eval RUN`` (by default on the run's val batches) gives exactly
    the figures the run recorded at its end, and says how many tokens they are over."""
    spec = tmp_path / "spec.json"
    data = make_spec(teachers=[{"path": str(teacher_dir)}])
    data["eval"] = {"batches": 3}
    spec.write_text(json.dumps(data))
    assert (
        kd("distill", spec, "--output", tmp_path / "run", "--set", "train.steps=3").returncode == 0
    )
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]
    report = json.loads(kd("eval", tmp_path / "run", "--json").stdout)
    assert recorded["tokens"] == report["tokens"] == 3 * 4 * 32
    for key in ("val_loss", "teacher_val_loss", "kl_teacher_student", "top1_agreement", "js"):
        assert report[key] == recorded[key], key
    text = kd("eval", tmp_path / "run").stdout
    assert f"{report['tokens']} loss tokens" in text
    assert f"val_loss: {recorded['val_loss']:.4f}" in text


def test_eval_on_a_missing_run_is_an_error(tmp_path):
    proc = kd("eval", tmp_path / "nothing")
    assert proc.returncode == 1 and "nothing" in proc.stderr


def test_python_api_composes_by_name():
    loss = testing.build_loss("ce")
    assert callable(loss)
    with pytest.raises(KeyError, match="did you mean"):
        testing.build_loss("cee")
