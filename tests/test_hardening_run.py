"""Hardening, round 3, for runs: sizes checked before memory is spent, a second signal
that stops a step at once, concurrent writers, a full disk, and the in-place Adam step
on arrays that others hold."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kdcore import app, testing
from kdcore.engine import sizes
from kdcore.engine.checkpoint import latest_checkpoint
from kdcore.io import write_json

# ---------------------------------------------------------------- sizes before memory


def test_a_step_too_big_for_the_machine_is_refused_before_anything_loads(
    tmp_path, make_spec, capsys
):
    data = make_spec()
    data["train"]["batch_size"] = 10_000_000
    with pytest.raises(app.SpecError) as err:
        app.distill(app.load_spec(data), output=tmp_path / "run", progress=False)
    message = str(err.value)
    assert "$.train.batch_size" in message and " GB" in message, message
    assert "run.memory_check = false" in message
    assert not (tmp_path / "run").exists()  # refused before the output folder was made
    # kd validate says the same, and the flag lets it through
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(data))
    assert testing.run_kd("validate", spec) == 2
    assert "$.train.batch_size" in capsys.readouterr().err
    assert testing.run_kd("validate", spec, "--set", "run.memory_check=false") == 0


def test_seq_len_beyond_a_models_context_is_refused_with_the_context(tmp_path, make_spec):
    data = make_spec()
    data["data"]["params"]["seq_len"] = 1_000_000_000
    with pytest.raises(app.SpecError) as err:
        app.distill(app.load_spec(data), output=tmp_path / "run", progress=False)
    message = str(err.value)
    assert "$.data.params.seq_len" in message and "context of" in message, message


@pytest.mark.parametrize("field", ["steps", "batch_size", "grad_accum"])
def test_absurd_counts_are_refused(make_spec, field):
    data = make_spec()
    data["train"][field] = 10**12
    with pytest.raises(app.SpecError, match=rf"{field} must be in \[1, 1e\+09\]"):
        app.load_spec(data)


def test_the_estimate_grows_with_the_batch_and_fits_a_real_model_shape():
    """SmolLM2-135M's shape: a 15-layer student and its 30-layer teacher at 4 x 512."""
    config = {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
    }
    teacher = sizes.shape_of_config(config)
    student = sizes.shape_of_config({**config, "num_hidden_layers": 15})
    assert teacher.params == pytest.approx(134.5e6, rel=0.05)  # its 134.5M parameters
    four = sum(sizes.step_bytes(student, [teacher], 4, 512).values())
    eight = sum(sizes.step_bytes(student, [teacher], 8, 512).values())
    assert 3e9 < four < 16e9  # fits this 24 GB machine, as the real run does
    assert eight > 1.5 * four


# ---------------------------------------------------------------- a second signal

HEAVY = textwrap.dedent(
    """
    import sys
    import mlx.core as mx
    from kdcore.engine.loop import StopRequest

    with StopRequest():
        a = mx.random.normal((1024, 1024))
        x = a
        for _ in range(2000):  # one evaluation of tens of seconds: no Python runs inside
            x = mx.tanh(x @ a)
        print("ready", flush=True)
        mx.eval(x)
        print("evaluated", flush=True)
    """
)


def _start_heavy(tmp_path: Path, env: dict | None = None) -> subprocess.Popen:
    script = tmp_path / "heavy.py"
    script.write_text(HEAVY)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (2, 15)],
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # inside the evaluation
    return proc


def _ends_within(proc: subprocess.Popen, seconds: float) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running {seconds} s later") from None
    return proc.returncode, out + err


def test_a_second_signal_ends_the_process_inside_an_evaluation(tmp_path):
    proc = _start_heavy(tmp_path)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    code, output = _ends_within(proc, 5)
    assert code == 128 + signal.SIGTERM and "evaluated" not in output, output
    assert "again, or after" in output


def test_the_first_signal_acts_like_the_second_after_the_stated_time(tmp_path):
    proc = _start_heavy(tmp_path, {"KD_STOP_GRACE_S": "2"})
    proc.send_signal(signal.SIGINT)
    code, output = _ends_within(proc, 8)
    assert code == 128 + signal.SIGINT and "evaluated" not in output, output
    assert "after 2 s: stop at once" in output


# ---------------------------------------------------------------- a full disk


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_a_full_disk_at_a_checkpoint_stops_clearly_keeps_the_last_and_resumes(
    tmp_path, make_spec, monkeypatch
):
    data = make_spec()
    data["train"]["steps"] = 6
    data["train"]["checkpoint_every"] = 2
    data["train"]["log_every"] = 1
    real = mx.save_safetensors

    def full_disk(path, arrays, metadata=None):
        if ".step-0000004." in str(path):  # MLX's own words when a write comes up short
            raise RuntimeError("[write] Unable to write 4096 bytes to file.")
        return real(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    out = tmp_path / "run"
    with pytest.raises(app.CheckpointError) as err:
        app.distill(app.load_spec(data), output=out, progress=False)
    message = str(err.value)
    assert "step 4 could not be written" in message and "disk full" in message, message
    assert "step-0000002 stands" in message and f"--resume --output {out}" in message
    checkpoints = out / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-0000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000002"]
    monkeypatch.setattr(mx, "save_safetensors", real)  # space is back
    app.distill(app.load_spec(data), output=out, resume=True, progress=False)
    app.distill(app.load_spec(data), output=tmp_path / "whole", progress=False)
    cut, whole = _losses(out), _losses(tmp_path / "whole")
    assert sorted(cut) == list(range(1, 7))
    for step in range(1, 7):
        assert cut[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), step


def test_a_full_disk_under_a_json_write_names_the_file_and_changes_nothing(
    tmp_path, monkeypatch, capsys
):
    target = tmp_path / "state.json"
    write_json(target, {"kept": True})

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(app.CheckpointError, match="no space left on the device writing"):
        write_json(target, {"kept": False})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary left


# ---------------------------------------------------------------- two writers at once


def test_two_kd_distill_into_one_new_output_at_once_one_runs(tmp_path, make_spec):
    data = make_spec()
    data["train"]["steps"] = 40
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(data))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kdcore.cli", "distill", str(spec), "--output", str(out)]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert (
        "in use by another kd distill" in refused
        or "not a kdcore run" in refused
        or ("already" in refused)
    ), refused
    assert "Traceback" not in refused
    steps = sorted(_losses(out))
    assert steps == sorted(set(steps)) and steps[-1] == 40  # one run's metrics, not two


def test_a_second_kd_cache_into_a_folder_in_use_is_refused(tmp_path, make_spec, teacher_dir):
    from kdcore.cache.write import write_cache
    from kdcore.engine.rundir import RunLock

    data = make_spec(teachers=[{"path": str(teacher_dir)}])
    folder = tmp_path / "cache"
    folder.mkdir()
    held = RunLock(folder, "kd cache")  # what a running kd cache holds
    try:
        with pytest.raises(app.CheckpointError, match="in use by another kd cache"):
            write_cache(app.load_spec(data), folder, top_k=4, progress=False)
        assert sorted(p.name for p in folder.iterdir()) == [".kd.lock"]  # nothing written
    finally:
        held.release()
    write_cache(app.load_spec(data), folder, top_k=4, progress=False)  # free again: it runs
    assert (folder / "manifest.json").is_file()


# ---------------------------------------------------------------- the in-place Adam step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_native_adam_step_never_writes_through_an_array_someone_else_holds(dtype):
    """A tied embedding (one array, the head too), an EMA teacher's deep copy of the
    student, and a reference a caller kept: after a native step all three still hold the
    values they had, and the student's new values equal mlx's own Adam to rounding."""
    import copy

    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    from kdcore.engine.optim import AdamW
    from kdcore.kernels.native import install_registered_kernels, native_kernel, use_row_kernels
    from kdcore.models.transformer import Transformer, TransformerConfig

    previous = install_registered_kernels()
    try:
        kernel = native_kernel("adam")
        assert kernel is not None, "kd-kernels' native Adam step is not installed"
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            return kernel(*args, **kwargs)

        results = {}
        for mode, step in (("native", counted), ("mlx", None)):
            mx.random.seed(0)
            config = TransformerConfig(vocab_size=64, dim=32, layers=1, heads=2, dtype=dtype)
            student = Transformer(config)
            assert config.tie_embeddings
            mx.eval(student.parameters())
            ema = copy.deepcopy(student)  # what the ema teacher source keeps
            held = student.embed.weight  # a caller's reference to the tied embedding
            before = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(ema.parameters())}
            held_before = np.array(held.astype(mx.float32))
            opt = AdamW(learning_rate=1e-2, weight_decay=0.01, kernel=step)
            grads = tree_map(lambda p: mx.ones_like(p) * 0.5, student.trainable_parameters())
            for _ in range(3):
                opt.update(student, grads)
                mx.eval(student.parameters(), opt.state)
            after = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(ema.parameters())}
            for name, value in before.items():
                np.testing.assert_array_equal(after[name], value, err_msg=f"{mode}: ema {name}")
            np.testing.assert_array_equal(np.array(held.astype(mx.float32)), held_before)
            assert not np.array_equal(
                np.array(student.embed.weight.astype(mx.float32)), held_before
            )
            results[mode] = {
                k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(student.parameters())
            }
        for name, value in results["mlx"].items():
            np.testing.assert_allclose(results["native"][name], value, rtol=1e-5, atol=1e-6)
        assert isinstance(opt, optim.AdamW)
        assert bool(calls) == (dtype == "float32")  # the native pass runs on float32 only
    finally:
        use_row_kernels(previous)
