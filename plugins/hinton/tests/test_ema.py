"""The ema teacher source: the average it keeps, its schedule, and checkpoint/resume."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
from kd_hinton.ema import EmaConfig, EmaTeacher
from mlx.utils import tree_flatten

import kdcore
from kdcore import app
from kdcore.app import Transformer, TransformerConfig


def _model(seed: int) -> Transformer:
    mx.random.seed(seed)
    model = Transformer(TransformerConfig(vocab_size=20, dim=16, layers=1, heads=2, max_seq_len=8))
    mx.eval(model.parameters())
    return model


def _flat(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_the_average_follows_the_decay_formula():
    student = _model(0)
    teacher = EmaTeacher(EmaConfig(decay=0.75))
    # the engine finds its optional methods through kdcore's protocols
    assert isinstance(teacher, kdcore.AfterStep) and isinstance(teacher, kdcore.HasState)
    batch = {"input_ids": mx.array([[1, 2, 3, 4]])}
    first = teacher.signal(batch, frozenset(), student)  # starts as a copy of the student
    np.testing.assert_allclose(np.array(first.logits), np.array(student(batch["input_ids"]).logits))
    start = _flat(student)
    student.update(_model(1).parameters())  # the student moves
    moved = _flat(student)
    teacher.after_step(student, 0, 10)
    for key, value in _flat(teacher.model).items():
        np.testing.assert_allclose(value, 0.75 * start[key] + 0.25 * moved[key], rtol=1e-6)
    assert teacher.model is not student and teacher.num_parameters == sum(
        v.size for v in start.values()
    )
    # the teacher is frozen: nothing of it trains
    assert not tree_flatten(teacher.model.trainable_parameters())


def test_the_decay_can_be_scheduled():
    config = app.make_config(
        "teacher_source", "ema", decay={"schedule": "linear", "start": 0.0, "end": 1.0}
    )
    student = _model(0)
    teacher = EmaTeacher(config)
    teacher.signal({"input_ids": mx.array([[1, 2]])}, frozenset(), student)
    target = _model(2)
    student.update(target.parameters())
    teacher.after_step(student, 0, 10)  # decay 0: the average jumps to the student
    for key, value in _flat(teacher.model).items():
        np.testing.assert_allclose(value, _flat(target)[key], rtol=1e-6)


def test_state_round_trip_before_and_after_the_model_exists():
    student = _model(0)
    a = EmaTeacher(EmaConfig(decay=0.5))
    a.after_step(student, 0, 4)
    student.update(_model(3).parameters())
    a.after_step(student, 1, 4)
    state = a.state_arrays()
    assert int(state["updates"].item()) == 2
    b = EmaTeacher(EmaConfig(decay=0.5))
    b.load_state_arrays(state)  # no model yet: applied when it is built
    b.signal({"input_ids": mx.array([[1]])}, frozenset(), _model(9))
    for key, value in _flat(a.model).items():
        np.testing.assert_array_equal(value, _flat(b.model)[key])
    assert b.updates == 2


def test_ema_self_distillation_resumes_exactly(spec_for, tmp_path):
    losses = [{"name": "ce"}, {"name": "hinton", "params": {"temperature": 2.0}}]
    spec = spec_for(losses, steps=4, teachers=[{"source": "ema", "params": {"decay": 0.5}}])
    spec["train"]["checkpoint_every"] = 2
    spec["train"]["keep_checkpoints"] = 5
    spec["train"]["final_checkpoint"] = True  # the EMA state at the end is compared below
    whole = tmp_path / "whole"
    app.distill(spec, output=whole, progress=False)

    # the same run stopped after step 2: keep only that checkpoint, then resume
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    shutil.rmtree(cut / "student")
    (cut / "checkpoints" / "latest").write_text("step-0000002\n")
    extra = mx.load(str(cut / "checkpoints" / "step-0000002" / "extra.safetensors"))
    trainable = mx.load(str(cut / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    key = "teacher.0.param.embed.weight"
    assert key in extra
    # the average is not the student, so a resume that rebuilt it from the student would differ
    assert not np.allclose(np.array(extra[key]), np.array(trainable["student.embed.weight"]))
    app.distill(spec, output=cut, resume=True, progress=False)

    a = mx.load(str(whole / "student" / "model.safetensors"))
    b = mx.load(str(cut / "student" / "model.safetensors"))
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), rtol=1e-5, atol=1e-6)
    ea = mx.load(str(whole / "checkpoints" / "step-0000004" / "extra.safetensors"))
    eb = mx.load(str(cut / "checkpoints" / "step-0000004" / "extra.safetensors"))
    np.testing.assert_allclose(np.array(ea[key]), np.array(eb[key]), rtol=1e-5, atol=1e-6)
    records = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
