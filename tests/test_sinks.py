"""Metric sinks: TensorBoard event files read back, and the jsonl sink."""

from __future__ import annotations

import json
import sys

import pytest

from kdcore import app
from kdcore.engine.sinks import MissingExtraError, read_event_scalars, scalars
from kdcore.errors import KdError


def _metrics(run):
    train, evals = {}, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (evals.append(record) if "eval" in record else train.setdefault(record["step"], record))
    return train, evals


def test_scalars_flattens_numbers_only():
    record = {
        "step": 3,
        "stage": "main",
        "loss": 1.5,
        "loss/ce": 2,
        "ok": True,
        "eval": {"kl": 0.25},
    }
    assert scalars(record, "train") == {
        "train/loss": 1.5,
        "train/loss/ce": 2.0,
        "train/eval/kl": 0.25,
    }


def test_tensorboard_events_hold_every_logged_value(tmp_path, make_spec):
    spec = make_spec(callbacks=[{"name": "tensorboard"}])
    spec["train"].update(steps=6, log_every=2)
    spec["eval"].update(every=3)
    summary = app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    logdir = tmp_path / "run" / "tensorboard"
    files = list(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = read_event_scalars(logdir)
    train, evals = _metrics(tmp_path / "run")
    logged = sorted(train)
    assert [s for s, _ in events["train/loss"]] == logged == [1, 2, 4, 6]
    for step, value in events["train/loss"]:
        assert value == pytest.approx(train[step]["loss"], rel=1e-6)
    for step, value in events["train/lr"]:
        assert value == pytest.approx(train[step]["lr"], rel=1e-6)
    assert "train/stage" not in events  # a string: not a scalar
    # periodic eval at step 3, and the final one from the summary at step 6
    assert [s for s, _ in events["eval/val_loss"]] == [3, 6]
    assert events["eval/val_loss"][0][1] == pytest.approx(evals[0]["eval"]["val_loss"], rel=1e-6)
    assert events["eval/val_loss"][1][1] == pytest.approx(summary["eval"]["val_loss"], rel=1e-6)
    # The events are real TFRecords: a flipped payload byte fails the checksum.
    data = bytearray(files[0].read_bytes())
    data[-6] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.raises(KdError, match="corrupt"):
        read_event_scalars(logdir)


def test_tensorboard_spec_text_is_recorded(tmp_path, make_spec):
    from tensorboardX.proto.event_pb2 import Event

    spec = make_spec(callbacks=[{"name": "tensorboard", "params": {"logdir": "tb"}}])
    spec["train"]["steps"] = 2
    app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    (events_file,) = (tmp_path / "run" / "tb").glob("events.out.tfevents.*")
    data = events_file.read_bytes()
    texts, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 8], "little")
        event = Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 16 + length
        texts += [
            v.tensor.string_val[0].decode() for v in event.summary.value if v.tag.startswith("spec")
        ]
    assert texts and "[run]" in texts[0] and 'name = "tiny"' in texts[0]


def test_tensorboard_without_the_extra_names_it(tmp_path, make_spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if absent
    with pytest.raises(MissingExtraError, match=r"kdcore\[tensorboard\]"):
        app.build("run_callback", "tensorboard")
    spec = make_spec(callbacks=[{"name": "tensorboard"}])
    with pytest.raises(MissingExtraError, match=r"pip install 'kdcore\[tensorboard\]'"):
        app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before training


def test_jsonl_sink_gathers_runs_in_one_file(tmp_path, make_spec):
    shared = tmp_path / "all.jsonl"
    for name in ("a", "b"):
        spec = make_spec(callbacks=[{"name": "jsonl", "params": {"path": str(shared)}}])
        spec["run"]["name"] = name
        spec["train"].update(steps=3, log_every=1)
        app.distill(app.load_spec(spec), output=tmp_path / name, progress=False)
    lines = [json.loads(x) for x in shared.read_text().splitlines()]
    assert [(x["run"], x["step"], x["kind"]) for x in lines] == [
        (run, step, kind)
        for run in ("a", "b")
        for step, kind in ((1, "train"), (2, "train"), (3, "train"), (3, "eval"))
    ]
    train, _ = _metrics(tmp_path / "b")
    for x in lines[4:7]:
        assert x["train/loss"] == train[x["step"]]["loss"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert lines[3]["eval/val_loss"] == summary["eval"]["val_loss"]
