"""``kd report``: the built-in curves and the sections plugins add through
``kd_report_sections``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kdcore
from kdcore import app, testing
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


# ---------------------------------------------------------------- what each plot shows


@pytest.fixture
def figures(monkeypatch):
    """Each figure the report saves, by file name: its title, y label and drawn series
    (label, points, marker), read from the matplotlib objects just before saving (a PNG
    cannot show whether a label is there)."""
    from matplotlib.figure import Figure

    seen: dict[str, dict] = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        seen[Path(path).name] = {
            "title": ax.get_title(),
            "ylabel": ax.get_ylabel(),
            "lines": [(ln.get_label(), len(ln.get_xdata()), ln.get_marker()) for ln in ax.lines],
        }
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


@pytest.fixture
def random_model_dir(tmp_path):
    return testing.save_random_model(tmp_path / "teacher", dim=16, max_seq_len=32)


def test_every_plot_is_labelled_with_its_metric_and_schedules_are_apart(
    corpus, random_model_dir, tmp_path, figures
):
    """A real run with a scheduled temperature and weight, evaluated only at the end (the
    default): the temperature is plotted as a schedule under its own name, never as
    ``reverse_kl``; each plot has a title and a y label; eval points are visible."""
    losses = [
        {"name": "ce"},
        {
            "name": "reverse_kl",
            "weight": {"schedule": "linear", "start": 0.0, "end": 1.0},
            "params": {"temperature": {"schedule": "cosine", "start": 4.0, "end": 1.0}},
        },
    ]
    spec = testing.tiny_spec(
        corpus, losses, steps=4, teachers=[{"path": str(random_model_dir)}], eval={"batches": 1}
    )
    run = tmp_path / "run"
    app.distill(spec, output=run, progress=False)
    text = write_report(run).read_text()

    for name, fig in figures.items():
        assert fig["title"], f"{name} has no title"
        assert fig["ylabel"], f"{name} has no y label"
        for label, points, marker in fig["lines"]:
            # one point with no marker draws nothing: the frame is empty
            assert points > 1 or marker not in ("", "None", None), f"{name}: {label} is invisible"
    by_series = {label: (name, fig) for name, fig in figures.items() for label, *_ in fig["lines"]}
    temperature_file, temperature = by_series["reverse_kl/temperature"]
    assert "reverse_kl/temperature" in temperature["title"]
    assert temperature["ylabel"] == "temperature"
    assert temperature_file != "reverse_kl.png"
    # schedules (lr, weights, scheduled params) are a section of their own after the curves
    schedules = text[text.index("## Schedules") :]
    curves = text[text.index("## Curves") : text.index("## Schedules")]
    for key in ("lr", "weight/reverse_kl", "reverse_kl/temperature"):
        file = by_series[key][0]
        assert f"report/{file}" in schedules and f"report/{file}" not in curves, key
    assert "report/losses.png" in curves
    # the eval series: drawn with markers, titled with their full names
    val_file, val = by_series["val_loss"]
    assert "val_loss" in val["title"] and val["lines"][0][2] not in ("", "None")
    assert f"report/{val_file}" in text[text.index("## Evaluation") :]
    assert {"kl_teacher_student", "top1_agreement"} <= set(by_series)


def test_a_report_without_a_spec_still_labels_its_plots(run_dir, figures):
    """The small hand-written run folder (no spec.toml): lr is still a schedule, titles and
    y labels still there, the single eval point still drawn."""
    write_report(run_dir)
    assert figures["losses.png"]["ylabel"] and figures["losses.png"]["title"]
    val = figures["eval_val_loss.png"]
    assert val["title"] and val["ylabel"] and val["lines"] == [("val_loss", 1, "o")]
