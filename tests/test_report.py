"""``kd report``: the built-in curves and the sections plugins add through
``kd_report_sections``."""

from __future__ import annotations

import json

import pytest

import kdcore
from kdcore.analysis.report import write_report
from kdcore.cli.main import main
from kdcore.errors import RegistryError
from kdcore.registry.manager import reset_registry


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with just enough in it for a report: four logged steps and an eval."""
    records = [{"step": s, "loss": 3.0 - 0.1 * s, "loss/ce": 3.0 - 0.1 * s} for s in range(4)]
    records.append({"step": 3, "eval": {"val_loss": 2.5}})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return tmp_path


class Section:
    """Writes a PNG-named file into the figures folder and links it."""

    @kdcore.hookimpl
    def kd_report_sections(self, run_dir, figures_dir):
        (figures_dir / "mine_plot.png").write_bytes(b"not really a png")
        return ["## Mine", "", "![mine](report/mine_plot.png)", f"- run: {run_dir.name}"]


class NotMine:
    @kdcore.hookimpl
    def kd_report_sections(self, run_dir):  # a subset of the arguments is fine
        return None


class Broken:
    @kdcore.hookimpl
    def kd_report_sections(self, run_dir, figures_dir):
        raise ValueError("no weights here")


class WrongType:
    @kdcore.hookimpl
    def kd_report_sections(self, run_dir, figures_dir):
        return "## a string, not a list of lines"


@pytest.fixture
def plugins():
    def register(*pairs):
        reset_registry(list(pairs))

    yield register
    reset_registry()


def test_plugin_section_is_appended_after_the_curves(run_dir, plugins):
    plugins((NotMine(), "test-not-mine"), (Section(), "test-section"))
    text = write_report(run_dir).read_text()
    assert "![losses](report/losses.png)" in text
    assert text.index("## Curves") < text.index("## Mine")
    assert f"![mine](report/mine_plot.png)\n- run: {run_dir.name}\n" in text
    assert (run_dir / "report" / "mine_plot.png").exists()
    assert "report section failed" not in text


def test_a_raising_section_is_reported_and_the_others_still_run(run_dir, plugins, monkeypatch):
    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    plugins((Broken(), "test-broken"), (WrongType(), "test-wrong"), (Section(), "test-section"))
    text = write_report(run_dir).read_text()
    assert "report section failed**: test-broken (test-broken): ValueError: no weights here" in text
    assert "test-wrong (test-wrong): RegistryError: kd_report_sections returned str" in text
    assert "## Mine" in text and "![losses](report/losses.png)" in text
    # the command line succeeds too
    assert main(["report", str(run_dir)]) == 0


def test_strict_plugins_fail_the_report_after_writing_it(run_dir, plugins, monkeypatch, capsys):
    monkeypatch.setenv("KD_STRICT_PLUGINS", "1")
    plugins((Broken(), "test-broken"))
    with pytest.raises(RegistryError, match="test-broken.*no weights here"):
        write_report(run_dir)
    assert "ValueError: no weights here" in (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 1
    assert "report section failed" in capsys.readouterr().err
    assert (run_dir / "report.md").exists()
