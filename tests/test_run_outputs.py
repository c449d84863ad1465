"""What a finished run says about itself (issue 30, point 9): the init label of a loaded
student, throughput figures that say what they count, and a final checkpoint kept only when
asked for (or when student/ cannot hold what the run learnt)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import kdcore
from kdcore import app, testing
from kdcore.engine.checkpoint import latest_checkpoint
from kdcore.engine.distill import train_parts


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the init label


def test_a_student_loaded_from_a_path_is_not_called_random(corpus, tmp_path):
    pytest.importorskip("mlx_lm")
    from kdcore.models.mlxlm import create_mlxlm_dir

    config = {
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256,
        "tie_word_embeddings": True,
    }
    folder = create_mlxlm_dir(tmp_path / "pretrained", config, seed=0)
    spec = testing.tiny_spec(corpus, steps=1)
    spec["student"] = {"model": {"name": "mlx-lm", "params": {"path": str(folder)}}}
    run = testing.build_run(spec)  # no init given: the default, "random"
    assert run.init_report["from"] == "loaded"
    assert run.init_report["path"] == str(folder)
    # a fresh student keeps saying random
    assert testing.build_run(testing.tiny_spec(corpus, steps=1)).init_report["from"] == "random"


# ---------------------------------------------------------------- tok/s


def test_throughput_counts_all_tokens_and_loss_tokens_each_named(corpus, tmp_path):
    spec = testing.tiny_spec(corpus, steps=2)
    spec["data"] = {
        "name": "jsonl",  # only the response carries loss: the two counts differ
        "params": {"path": str(_pairs(tmp_path)), "seq_len": 32, "val_fraction": 0.25},
    }
    stream = io.StringIO()
    run = testing.build_run(spec)
    run.dp.log_stream = lambda: stream  # the progress lines, as a log file gets them
    summary = train_parts(run, tmp_path / "run", progress=False)
    logged = [r for r in _records(tmp_path / "run") if "loss" in r]
    batch = run.dataset.batch(0, 4)
    tokens, loss_tokens = batch["input_ids"].size, int(batch["mask"].sum())
    assert 0 < loss_tokens < tokens
    first = logged[0]
    ratio = first["tokens_per_s"] / first["loss_tokens_per_s"]
    assert ratio == pytest.approx(tokens / loss_tokens)
    assert first["tokens_per_s"] * first["step_s"] == pytest.approx(tokens)
    assert summary["tokens_per_s"] > summary["loss_tokens_per_s"] > 0
    lines = [ln for ln in stream.getvalue().splitlines() if "step 1/" in ln]
    assert lines and " tok/s " in lines[0] and "loss_tok/s" in lines[0], stream.getvalue()


def _pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" {2 * i}."}
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- the final checkpoint


def test_a_finished_run_keeps_no_final_checkpoint_unless_asked(corpus, tmp_path):
    spec = testing.tiny_spec(corpus, steps=4)
    spec["train"]["checkpoint_every"] = 2
    assert app.load_spec(spec).train.final_checkpoint is False  # the default, stated
    app.distill(spec, output=tmp_path / "lean", progress=False)
    assert (tmp_path / "lean" / "student" / "model.safetensors").exists()
    assert latest_checkpoint(tmp_path / "lean" / "checkpoints").name == "step-0000002"
    assert not (tmp_path / "lean" / "checkpoints" / "step-0000004").exists()
    # the run still opens, with the trained student (student/'s weights, not step 2's)
    opened = app.open_run(tmp_path / "lean")
    saved, _arch, _config = app.load_model(tmp_path / "lean" / "student")
    trained = dict(tree_flatten(saved.parameters()))
    for name, value in tree_flatten(opened.student.parameters()):
        assert mx.array_equal(value, trained[name]).item(), name
    # asked for: the resumable state at the end, which a longer resume continues from
    spec["train"]["final_checkpoint"] = True
    app.distill(spec, output=tmp_path / "full", progress=False)
    assert latest_checkpoint(tmp_path / "full" / "checkpoints").name == "step-0000004"
    spec["train"]["steps"] = 6
    summary = app.distill(spec, output=tmp_path / "full", resume=True, progress=False)
    assert summary["steps"] == 6


def test_a_finished_run_without_any_checkpoint_cannot_be_extended(corpus, tmp_path):
    spec = testing.tiny_spec(corpus, steps=2)
    app.distill(spec, output=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    spec["train"]["steps"] = 3
    with pytest.raises(app.CheckpointError, match="final_checkpoint = true"):
        app.distill(spec, output=tmp_path / "run", resume=True, progress=False)


def test_a_run_that_learns_beside_the_student_keeps_its_final_checkpoint(
    corpus, tmp_path, teacher_dir
):
    spec = testing.tiny_spec(corpus, [{"name": "ce"}, {"name": "hinton"}], steps=2)
    spec["teachers"] = [{"path": str(teacher_dir)}, {"path": str(teacher_dir)}]
    spec["aggregator"] = {"name": "weighted", "params": {"learnable": True}}
    app.distill(spec, output=tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000002"
    # fixed weights learn nothing: student/ is all there is to keep
    spec["aggregator"]["params"]["learnable"] = False
    app.distill(spec, output=tmp_path / "fixed", progress=False)
    assert not (tmp_path / "fixed" / "checkpoints").exists()


class _PoisonAtEnd:
    """A teacher source that leaves the student NaN after the run's last update (what an
    overflowing update does): the end of the run must still refuse it."""

    @kdcore.hookimpl
    def kd_teacher_sources(self):
        from mlx.utils import tree_map

        from kdcore.teachers.model import ModelSourceConfig, ModelTeacher

        class Poisoning(ModelTeacher):
            def after_step(self, student, step, total):
                if step == total - 1:
                    student.update(tree_map(lambda p: p * float("nan"), student.parameters()))

        return [kdcore.Component("poisoning", Poisoning, ModelSourceConfig, doc="poisons")]


def test_without_a_final_checkpoint_a_non_finite_student_is_still_refused(
    corpus, tmp_path, teacher_dir
):
    spec = testing.tiny_spec(corpus, [{"name": "ce"}, {"name": "hinton"}], steps=4)
    spec["teachers"] = [{"source": "poisoning", "path": str(teacher_dir)}]
    spec["train"]["checkpoint_every"] = 2
    with testing.plugins(_PoisonAtEnd()):
        with pytest.raises(app.NonFiniteLossError) as err:
            app.distill(spec, output=tmp_path / "run", progress=False)
    assert err.value.term == "parameters" and "step-0000002" in str(err.value)
    assert not (tmp_path / "run" / "student").exists()
