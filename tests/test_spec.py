"""The spec converter: strict structuring, every problem at once, overrides, schedules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kdcore
from kdcore import app, testing
from kdcore.spec.load import apply_overrides, parse_override, spec_to_dict
from kdcore.spec.schedules import Schedule
from kdcore.spec.tomlwrite import dumps

THREE_MISTAKES = """
[data]
name = "text"
params = { path = "x.txt" }

[[losses]]
name = "cee"

[[losses]]
name = "ce"
weight = "high"

[train]
stepz = 10
"""


def test_three_mistakes_are_three_lines_with_paths(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(THREE_MISTAKES)
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore.cli", "validate", str(spec)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert any("$.losses[0].name" in ln and "did you mean 'ce'" in ln for ln in lines)
    assert any("$.losses[1].weight" in ln and "str" in ln for ln in lines)
    assert any("$.train.stepz" in ln and "unknown key" in ln for ln in lines)


def test_good_spec_validates(tmp_path, make_spec):
    spec = tmp_path / "ok.json"
    spec.write_text(json.dumps(make_spec()))
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore.cli", "validate", str(spec)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_params_structured_into_component_config(make_spec):
    spec = app.load_spec(make_spec(losses=[{"name": "ce", "params": {"label_smoothing": 0.1}}]))
    assert spec.losses[0].config.label_smoothing == pytest.approx(0.1)


def test_params_errors_carry_the_entry_path(make_spec):
    bad = make_spec(losses=[{"name": "ce", "params": {"label_smoothing": "lots", "extra": 1}}])
    with pytest.raises(kdcore.SpecError) as err:
        app.load_spec(bad)
    text = str(err.value)
    assert "$.losses[0].params.label_smoothing" in text
    assert "unknown key @ $.losses[0].params.extra" in text


def test_any_float_may_be_a_schedule(make_spec):
    spec = app.load_spec(
        make_spec(
            losses=[
                {"name": "ce", "weight": {"schedule": "cosine", "start": 4.0, "end": 1.0}},
            ]
        )
    )
    weight = spec.losses[0].weight
    assert isinstance(weight, Schedule)
    assert weight(0, 10) == pytest.approx(4.0)
    assert weight(10, 10) == pytest.approx(1.0)


def test_schedule_errors_are_reported(make_spec):
    bad = make_spec(losses=[{"name": "ce", "weight": {"schedule": "cosin", "start": 1.0}}])
    with pytest.raises(kdcore.SpecError) as err:
        app.load_spec(bad)
    assert "did you mean 'cosine'" in str(err.value)
    assert "$.losses[0].weight" in str(err.value)


def test_unknown_component_lists_installed_names(make_spec):
    with pytest.raises(kdcore.SpecError) as err:
        app.load_spec(make_spec(aggregator={"name": "meen"}))
    assert "did you mean 'mean'" in str(err.value)
    assert "installed:" in str(err.value)
    assert "$.aggregator.name" in str(err.value)


def test_bool_is_not_a_number(make_spec):
    with pytest.raises(kdcore.SpecError) as err:
        app.load_spec(make_spec(train={"steps": True}))
    assert "$.train.steps" in str(err.value)


def test_overrides_parse_toml_literals():
    assert parse_override("train.steps=10") == (["train", "steps"], 10)
    assert parse_override("run.name=hello") == (["run", "name"], "hello")
    assert parse_override("losses.0.weight={schedule='linear'}") == (
        ["losses", "0", "weight"],
        {"schedule": "linear"},
    )
    data = apply_overrides({"losses": [{"name": "ce"}]}, ["losses.0.weight=0.5", "train.steps=3"])
    assert data == {"losses": [{"name": "ce", "weight": 0.5}], "train": {"steps": 3}}


def test_override_past_list_end_is_an_error():
    with pytest.raises(kdcore.SpecError):
        apply_overrides({"losses": []}, ["losses.2.weight=1"])


def test_resolved_spec_round_trips_through_toml(tmp_path, make_spec):
    spec = app.load_spec(
        make_spec(
            losses=[
                {"name": "ce", "weight": {"schedule": "linear", "start": 1.0, "end": 0.5}},
            ]
        )
    )
    text = dumps(spec_to_dict(spec))
    path = tmp_path / "spec.toml"
    path.write_text(text)
    again = app.load_spec(path)
    assert spec_to_dict(again) == spec_to_dict(spec)


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(kdcore.SpecError) as err:
        app.load_spec(tmp_path / "nope.toml")
    assert "nope.toml" in str(err.value)


def test_build_by_name_validates_params():
    loss = testing.build_loss("ce", label_smoothing=0.0)
    assert callable(loss)
    with pytest.raises(kdcore.SpecError):
        testing.build_loss("ce", smoothing=0.1)


# ---------------------------------------------------------------- unreadable specs (issue 20)


def _validate_file(path, capsys) -> tuple[int, str]:
    from kdcore.cli.main import main as kd_main

    capsys.readouterr()
    code = kd_main(["validate", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("latin1.toml", b'[data]\nname = "text"\nparams = { path = "caf\xe9.txt" }\n', "line 3"),
        ("deep.toml", b"a = " + b"[" * 50_000 + b"]" * 50_000, "nested"),
        ("deep.json", b"[" * 50_000 + b"]" * 50_000, "nested"),
        ("tables.json", b'{"a": ' * 900 + b"1" + b"}" * 900, "nested"),
        ("digits.toml", b"[train]\nsteps = " + b"7" * 5000 + b"\n", "5000 digits"),
        ("digits.json", b'{"train": {"steps": ' + b"7" * 5000 + b"}}", "5000 digits"),
        ("wide.toml", b"[run]\nseed = " + b"7" * 40 + b"\n", "64 bits"),
    ],
)
def test_an_unreadable_spec_is_an_error_not_a_traceback(tmp_path, capsys, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    code, err = _validate_file(path, capsys)
    assert code == 2, err
    assert words in err and "Traceback" not in err, err
    assert str(path) in err or "$." in err, err


def test_a_directory_is_not_a_spec(tmp_path, capsys):
    code, err = _validate_file(tmp_path, capsys)
    assert code == 2 and "directory" in err, err


def test_a_deep_override_is_an_error(make_spec):
    with pytest.raises(kdcore.SpecError, match="--set"):
        app.load_spec(make_spec(), ["run.name=" + "[" * 50_000 + "]" * 50_000])
