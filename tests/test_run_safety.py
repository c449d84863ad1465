"""A user's run is never lost: the NaN guard, Ctrl-C and SIGTERM, the output folder, the lock,
and checkpoints checked rather than trusted (issue 20, points 3, 4, 5 and 8)."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

import kdcore
from kdcore import app, testing
from kdcore.engine import checkpoint as ckpt
from kdcore.engine.checkpoint import latest_checkpoint, load_checkpoint
from kdcore.io import load_arrays
from kdcore.registry.manager import reset_registry


@pytest.fixture
def make_spec(corpus):
    """The tiny spec, keeping its final checkpoint: resuming and checking finished runs is
    what this file tests, and ``train.final_checkpoint`` is off by default."""

    def make(**sections):
        data = testing.tiny_spec(corpus, steps=6, **sections)
        data["train"]["final_checkpoint"] = True
        return data

    return make


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def _all_finite(path: Path) -> bool:
    _, trainable, optimizer, _ = load_checkpoint(path)
    arrays = [*trainable.values(), *optimizer.values()]
    return all(
        bool(mx.all(mx.isfinite(a)).item()) for a in arrays if mx.issubdtype(a.dtype, mx.floating)
    )


# ---------------------------------------------------------------- point 3: the NaN guard


class _BadAt:
    """Plugin losses that go wrong at one step: ``nan-grad`` keeps a finite value whose
    gradient is NaN; ``poison`` makes the student's parameters NaN before the step (what an
    update that overflowed leaves behind)."""

    def __init__(self, step: int):
        self.step = step

    @kdcore.hookimpl
    def kd_losses(self):
        at = self.step

        def nan_grad(config, setup):
            def loss(inputs):
                base = kdcore.masked_mean(inputs.student.logits.mean(-1) ** 2, inputs.batch["mask"])
                if inputs.step != at:
                    return base, {}
                # sqrt at 0 has an infinite slope: value base + 0, gradient 0 * inf = NaN
                kink = mx.sqrt(base * 0.0)
                return base + kink - mx.stop_gradient(kink), {}

            return loss

        class Poison:
            def __init__(self, config, setup):
                pass

            def prepare_batch(self, batch, context):
                if context.step == at:
                    student = context.student
                    student.update(tree_map(lambda p: p * float("nan"), student.parameters()))
                return batch

            def __call__(self, inputs):
                return mx.array(0.0), {}

        return [
            kdcore.Component("nan-grad", nan_grad, doc="NaN gradient at one step"),
            kdcore.Component("poison", Poison, doc="NaN parameters at one step"),
        ]


def _guarded_run(make_spec, tmp_path, loss: str):
    reset_registry([(_BadAt(3), "test-bad")])
    try:
        data = make_spec(losses=[{"name": "ce"}, {"name": loss}])
        data["train"].update(checkpoint_every=2, keep_checkpoints=1)
        with pytest.raises(app.NonFiniteLossError) as err:
            app.distill(app.load_spec(data), output=tmp_path / "run", progress=False)
    finally:
        reset_registry()
    return err.value


def test_nan_gradient_stops_before_the_update_and_every_checkpoint_is_finite(tmp_path, make_spec):
    err = _guarded_run(make_spec, tmp_path, "nan-grad")
    root = tmp_path / "run" / "checkpoints"
    saved = sorted(p for p in root.glob("step-*"))
    assert saved, "no checkpoint left"
    for path in saved:
        assert _all_finite(path), f"{path.name} holds non-finite parameters"
    latest = latest_checkpoint(root)
    assert err.step == 4 and str(latest) in str(err)
    state, _, _, _ = load_checkpoint(latest)
    assert state["step"] == 3  # the state before the step whose gradient was NaN


def test_non_finite_parameters_are_never_saved_and_the_error_names_the_last_finite_one(
    tmp_path, make_spec
):
    err = _guarded_run(make_spec, tmp_path, "poison")
    root = tmp_path / "run" / "checkpoints"
    latest = latest_checkpoint(root)
    assert latest is not None and latest.name == "step-0000002"  # pruning kept it
    assert _all_finite(latest)
    assert [p.name for p in root.glob("step-*")] == ["step-0000002"]
    assert "step-0000002" in str(err) and "--resume" in str(err)


def test_the_checkpoint_writer_refuses_non_finite_arrays(tmp_path):
    good = {"w": mx.ones((2, 2))}
    ckpt.save_checkpoint(tmp_path, 4, good, {}, {}, {"spec_hash": "x"}, keep=1)
    with pytest.raises(app.CheckpointError, match="non-finite.*'w'"):
        ckpt.save_checkpoint(
            tmp_path, 5, {"w": mx.array([1.0, float("inf")])}, {}, {}, {"spec_hash": "x"}, keep=1
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000004"]


# ---------------------------------------------------------------- point 4: stops


def _long_run(make_spec, tmp_path) -> tuple[dict, Path]:
    data = make_spec()
    data["train"]["steps"] = 100_000  # never finishes by itself: the signal ends it
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(data))
    return data, spec


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _start_and_wait_for_a_metrics_line(spec: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdcore.cli", "distill", str(spec), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started as a background job ignores SIGINT, and kd keeps a signal it was
        # started ignoring ignored (StopRequest): the run under test starts with the default
        preexec_fn=_default_signals,
    )
    deadline = time.monotonic() + 180
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no metrics line: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def _stopped(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, stderr


def test_sigint_saves_a_checkpoint_prints_the_resume_command_and_resumes_exactly(
    tmp_path, make_spec
):
    data, spec = _long_run(make_spec, tmp_path)
    out = tmp_path / "cut"
    proc = _start_and_wait_for_a_metrics_line(spec, out)
    code, stderr = _stopped(proc, signal.SIGINT)
    assert code == 130, stderr
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None, stderr
    state, _, _, _ = load_checkpoint(latest)
    stopped_at = state["step"]
    assert state["reason"] == "interrupted"
    assert f"--output {out} --resume" in stderr and str(spec) in stderr
    assert not (out / "summary.json").exists()

    # Resume and train two steps more; an uninterrupted run of as many steps agrees exactly.
    total = stopped_at + 2
    data["train"]["steps"] = total
    app.distill(app.load_spec(data), output=out, resume=True, progress=False)
    app.distill(app.load_spec(data), output=tmp_path / "whole", progress=False)
    cut, whole = _losses(out), _losses(tmp_path / "whole")
    assert sorted(cut) == sorted(whole) == list(range(1, total + 1))
    assert cut == whole
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == sorted(set(steps)), "metrics mixed or repeated"
    a = mx.load(str(out / "student" / "model.safetensors"))
    b = mx.load(str(tmp_path / "whole" / "student" / "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(np.array(a[name]), np.array(b[name]))


def test_sigterm_saves_a_checkpoint_and_the_running_folder_is_locked(tmp_path, make_spec):
    data, spec = _long_run(make_spec, tmp_path)
    out = tmp_path / "run"
    proc = _start_and_wait_for_a_metrics_line(spec, out)
    try:
        with pytest.raises(app.CheckpointError, match="another kd distill"):
            app.distill(app.load_spec(data), output=out, resume=True, progress=False)
    finally:
        code, stderr = _stopped(proc, signal.SIGTERM)
    assert code == 143, stderr
    state, _, _, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert state["reason"] == "interrupted" and "--resume" in stderr


class _FailAt:
    """A run callback that crashes the run at one step (like a kill before any checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    @kdcore.hookimpl
    def kd_run_callbacks(self):
        at = self.step

        class Fail:
            def __init__(self, config, setup):
                pass

            def on_log(self, step, record):
                if step == at:
                    raise RuntimeError("crash")

        return [kdcore.Component("fail-at", Fail, doc="crashes")]


def test_an_unfinished_run_is_refused_or_resumed_never_mixed(tmp_path, make_spec):
    reset_registry([(_FailAt(3), "test-fail")])
    try:
        failing = make_spec(callbacks=[{"name": "fail-at"}])
        with pytest.raises(RuntimeError, match="crash"):
            app.distill(app.load_spec(failing), output=tmp_path / "run", progress=False)
    finally:
        reset_registry()
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    spec = app.load_spec(make_spec())
    with pytest.raises(app.CheckpointError, match=r"already holds a run \(unfinished\).*--resume"):
        app.distill(spec, output=run, progress=False)
    assert (run / "metrics.jsonl").read_text() == before
    app.distill(spec, output=run, resume=True, progress=False)  # from step 0: no checkpoint
    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in records if "eval" in r] == [6]


def test_resuming_a_finished_run_cleans_orphans_and_writes_the_final_eval_once(tmp_path, make_spec):
    spec = app.load_spec(make_spec())
    run = tmp_path / "run"
    app.distill(spec, output=run, progress=False)
    # what a kill leaves: a half-written checkpoint folder with a shard, temporary files
    orphan = run / "checkpoints" / ".step-0000007.k2j4h5g6"
    orphan.mkdir()
    (orphan / ".trainable.safetensors.a1b2c3d4.tmp.safetensors").write_bytes(b"half")
    (run / "checkpoints" / ".latest.q1w2e3r4.tmp").write_text("step-0000007\n")
    (run / ".summary.json.z9x8c7v6.tmp").write_text("{")
    (run / "student.tmp").mkdir()
    app.distill(spec, output=run, resume=True, progress=False)
    assert not orphan.exists()
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*"))
    assert not (run / "student.tmp").exists()
    assert [r["step"] for r in _records(run) if "eval" in r] == [6]


# ---------------------------------------------------------------- point 5: the output folder


@pytest.mark.parametrize("kind", ["project", "teacher"])
def test_output_into_a_folder_that_is_not_a_run_is_refused(tmp_path, make_spec, kind):
    data = make_spec()
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "project":  # the spec's own folder, with a student/ the user made
        (folder / "spec.toml").write_text("# the user's spec\n")
        (folder / "student").mkdir()
        (folder / "student" / "notes.txt").write_text("mine")
    else:  # a saved model's folder
        testing.save_random_model(folder)
    before = _snapshot(folder)
    with pytest.raises(app.CheckpointError, match="not a kd run"):
        app.distill(app.load_spec(data), output=folder, progress=False)
    with pytest.raises(app.CheckpointError, match="not a kd run"):
        app.distill(app.load_spec(data), output=folder, resume=True, progress=False)
    assert _snapshot(folder) == before


def test_an_empty_existing_folder_is_a_fine_output(tmp_path, make_spec):
    (tmp_path / "empty").mkdir()
    summary = app.distill(app.load_spec(make_spec()), output=tmp_path / "empty", progress=False)
    assert summary["steps"] == 6


def test_a_refused_resume_writes_nothing_and_names_the_fields_that_differ(tmp_path, make_spec):
    run = tmp_path / "run"
    app.distill(app.load_spec(make_spec()), output=run, progress=False)
    before = _snapshot(run)
    other = make_spec()
    other["train"]["optimizer"]["lr"] = 1e-2
    other["train"]["batch_size"] = 2
    with pytest.raises(app.CheckpointError, match="different spec") as err:
        app.distill(app.load_spec(other), output=run, resume=True, progress=False)
    assert "train.optimizer.lr: 0.003 -> 0.01" in str(err.value)
    assert "train.batch_size: 4 -> 2" in str(err.value)
    assert _snapshot(run) == before


def test_growing_train_steps_is_a_normal_resume(tmp_path, make_spec):
    run = tmp_path / "run"
    app.distill(app.load_spec(make_spec()), output=run, progress=False)
    longer = make_spec()
    longer["train"]["steps"] = 9
    summary = app.distill(app.load_spec(longer), output=run, resume=True, progress=False)
    assert summary["steps"] == 9
    app.distill(app.load_spec(longer), output=tmp_path / "whole", progress=False)
    assert _losses(run) == _losses(tmp_path / "whole")
    assert [r["step"] for r in _records(run) if "eval" in r] == [9]
    assert app.load_run_spec(run).train.steps == 9


def test_steps_below_the_checkpoint_are_refused(tmp_path, make_spec):
    run = tmp_path / "run"
    app.distill(app.load_spec(make_spec()), output=run, progress=False)
    before = _snapshot(run)
    shorter = make_spec()
    shorter["train"]["steps"] = 3
    with pytest.raises(app.CheckpointError, match=r"step 6 .*train\.steps"):
        app.distill(app.load_spec(shorter), output=run, resume=True, progress=False)
    assert _snapshot(run) == before


# ---------------------------------------------------------------- point 8: checked, not trusted


def test_latest_must_name_a_checkpoint_inside_its_folder(tmp_path, make_spec):
    spec = app.load_spec(make_spec())
    run = tmp_path / "run"
    app.distill(spec, output=run, progress=False)
    outside = tmp_path / "elsewhere"
    latest_checkpoint(run / "checkpoints").rename(outside)
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    with pytest.raises(app.CheckpointError, match="latest"):
        latest_checkpoint(run / "checkpoints")
    with pytest.raises(app.CheckpointError, match="latest"):
        app.distill(spec, output=run, resume=True, progress=False)


def _rewrite_state(path: Path, change) -> None:
    state_file = path / "state.json"
    state = json.loads(state_file.read_text())
    state = change(state)
    state_file.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: {**s, "step": "6"}, "step"),
        (lambda s: {**s, "step": -1}, "step"),
        (lambda s: {**s, "stage": True}, "stage"),
        (lambda s: {k: v for k, v in s.items() if k != "sha256"}, "sha256"),
        (lambda s: {**s, "sha256": {**s["sha256"], "trainable.safetensors": "0" * 64}}, "sha256"),
        (lambda s: {**s, "reason": "edited"}, "state.json"),  # the state's own hash
        (lambda s: [s], "state.json"),
    ],
)
def test_state_json_is_validated(tmp_path, make_spec, change, words):
    run = tmp_path / "run"
    app.distill(app.load_spec(make_spec()), output=run, progress=False)
    latest = latest_checkpoint(run / "checkpoints")
    _rewrite_state(latest, change)
    with pytest.raises(app.CheckpointError, match=words):
        load_checkpoint(latest)


def _safetensors(path: Path, header: dict, body: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


@pytest.mark.parametrize(
    "tensor, length, words",
    [
        ({"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}, None, "negative"),
        ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 10**12]}, None, "offsets"),
        ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 24]}, None, "24 bytes"),
        ({"dtype": "Q9", "shape": [2, 3], "data_offsets": [0, 24]}, None, "dtype"),
        ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, 2**62, "header"),
    ],
)
def test_a_bad_shard_header_is_refused(tmp_path, tensor, length, words):
    path = _safetensors(tmp_path / "x.safetensors", {"w": tensor}, bytes(24), length)
    with pytest.raises(app.CheckpointError, match=words):
        load_arrays(path, "checkpoint weights")


def test_a_good_shard_still_loads(tmp_path):
    mx.save_safetensors(str(tmp_path / "ok.safetensors"), {"w": mx.arange(6).reshape(2, 3)})
    loaded = load_arrays(tmp_path / "ok.safetensors")
    assert loaded["w"].shape == (2, 3) and loaded["w"].tolist()[1] == [3, 4, 5]


def test_runs_made_before_this_rounds_fields_hash_the_same():
    """train.fused_loss, train.checkpoint_layers, train.on_policy (off) and the transformer's
    dtype (float32) were added later: at those values a spec hashes as it did before them
    (9cfbbb6159b0e00e, computed with kdcore at commit cc636d1), so older runs resume."""
    from kdcore.engine.rundir import spec_hash
    from kdcore.spec.load import load_spec, spec_to_dict

    spec = testing.tiny_spec(
        "data.txt", [{"name": "ce", "weight": 0.5}], teachers=[{"path": "teacher"}]
    )
    assert spec_hash(spec_to_dict(load_spec(spec))) == "9cfbbb6159b0e00e"
    spec["train"]["on_policy"] = {"lmbda": 0.5}
    assert spec_hash(spec_to_dict(load_spec(spec))) != "9cfbbb6159b0e00e"
