"""The cot and step_by_step losses: conformance kit and their own properties."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kdcore import IGNORE_INDEX, LossInputs, ModelOutput, TeacherSignal, testing


def reasoning_batch(B, L, V, mask, rng):
    """Default batch plus a split of the loss mask into reasoning and answer positions."""
    batch = testing.default_batch(B, L, V, mask, rng)
    answer = (rng.random((B, L)) < 0.4).astype(np.float32) * mask
    batch["answer_mask"] = answer
    batch["reasoning_mask"] = mask - answer
    return batch


def task_batch(B, L, V, mask, rng):
    batch = testing.default_batch(B, L, V, mask, rng)
    batch["task"] = rng.integers(0, 2, size=(B,)).astype(np.int32)
    return batch


def test_cot_conforms():
    testing.check_loss("cot", extra_batch=reasoning_batch, temperature=2.0)


def test_cot_conforms_with_scheduled_weights():
    testing.check_loss(
        "cot",
        extra_batch=reasoning_batch,
        answer_weight={"schedule": "linear", "start": 2.0, "end": 0.5},
        max_examples=5,
    )


def test_step_by_step_conforms():
    testing.check_loss("step_by_step", extra_batch=task_batch, alpha=0.3)


def _inputs(student, teacher, batch):
    return LossInputs(
        student=ModelOutput(logits=mx.array(student)),
        teacher=TeacherSignal(vocab_size=teacher.shape[-1], logits=mx.array(teacher)),
        batch={k: mx.array(v) for k, v in batch.items()},
    )


def _case(seed=0, B=2, L=5, V=7):
    rng = np.random.default_rng(seed)
    student = rng.standard_normal((B, L, V)).astype(np.float32) * 3
    teacher = rng.standard_normal((B, L, V)).astype(np.float32) * 3
    mask = np.ones((B, L), np.float32)
    mask[:, 0] = 0
    batch = reasoning_batch(B, L, V, mask, rng)
    batch["answer_mask"][:, -1] = 1.0  # at least one answer position per row
    batch["reasoning_mask"] = mask - batch["answer_mask"]
    return student, teacher, batch


def test_cot_is_zero_at_identity_without_ce():
    student, _, batch = _case()
    loss = testing.build_loss("cot", ce_weight=0.0, temperature=3.0)
    value, metrics = loss(_inputs(student, student, batch))
    assert abs(value.item()) < 1e-6
    assert abs(metrics["kl_answer"].item()) < 1e-6


def test_cot_matches_hand_computed_terms():
    student, teacher, batch = _case(1)
    T, wr, wa, wce = 2.0, 0.7, 3.0, 0.5
    loss = testing.build_loss(
        "cot", temperature=T, reasoning_weight=wr, answer_weight=wa, ce_weight=wce
    )
    value, metrics = loss(_inputs(student, teacher, batch))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(teacher / T), log_softmax(student / T)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    r, a, m = batch["reasoning_mask"], batch["answer_mask"], batch["mask"]
    kl_r, kl_a = (kl * r).sum() / r.sum(), (kl * a).sum() / a.sum()
    labels = batch["labels"]
    ls = log_softmax(student)
    safe = np.where(labels == IGNORE_INDEX, 0, labels)
    nll = -np.take_along_axis(ls, safe[..., None], -1)[..., 0]
    ce = (nll * m).sum() / m.sum()
    expected = T * T * (wr * kl_r + wa * kl_a) + wce * ce
    assert value.item() == pytest.approx(expected, rel=1e-4)
    assert metrics["kl_reasoning"].item() == pytest.approx(kl_r, rel=1e-4)
    assert metrics["kl_answer"].item() == pytest.approx(kl_a, rel=1e-4)
    assert metrics["ce"].item() == pytest.approx(ce, rel=1e-4)


def test_cot_weights_reasoning_and_answer_apart():
    student, teacher, batch = _case(2)
    answer_only = testing.build_loss("cot", reasoning_weight=0.0, ce_weight=0.0)
    reasoning_only = testing.build_loss("cot", answer_weight=0.0, ce_weight=0.0)
    at_answer = batch["answer_mask"][..., None] > 0
    moved = np.where(
        at_answer, teacher + np.random.default_rng(0).normal(size=teacher.shape) * 5, teacher
    ).astype(np.float32)
    base_a = answer_only(_inputs(student, teacher, batch))[0].item()
    base_r = reasoning_only(_inputs(student, teacher, batch))[0].item()
    # changing the teacher only at answer positions moves the answer term, not the reasoning one
    assert answer_only(_inputs(student, moved, batch))[0].item() != pytest.approx(base_a)
    assert reasoning_only(_inputs(student, moved, batch))[0].item() == pytest.approx(base_r)


def test_cot_from_a_top_k_cache_equals_dense_when_k_is_the_vocabulary():
    student, teacher, batch = _case(3)
    V = teacher.shape[-1]
    logp = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    order = np.argsort(-logp, -1)
    sparse = TeacherSignal(
        vocab_size=V,
        topk_ids=mx.array(order.astype(np.int32)),
        topk_logprobs=mx.array(np.take_along_axis(logp, order, -1)),
        tail_logmass=mx.full(teacher.shape[:2], -30.0),
    )
    loss = testing.build_loss("cot", temperature=2.0)
    dense_inputs = _inputs(student, teacher, batch)
    dense = loss(dense_inputs)[0].item()
    from_cache = loss(LossInputs(dense_inputs.student, sparse, dense_inputs.batch))[0].item()
    assert from_cache == pytest.approx(dense, rel=1e-4)


def test_cot_says_which_dataset_gives_the_masks():
    student, teacher, batch = _case()
    del batch["reasoning_mask"]
    with pytest.raises(KeyError, match="rationale"):
        testing.build_loss("cot")(_inputs(student, teacher, batch))


def test_step_by_step_alpha_endpoints_select_one_task():
    rng = np.random.default_rng(4)
    B, L, V = 4, 6, 9
    student = rng.standard_normal((B, L, V)).astype(np.float32)
    mask = np.ones((B, L), np.float32)
    batch = testing.default_batch(B, L, V, mask, rng)
    batch["task"] = np.array([0, 1, 0, 1], np.int32)
    inputs = _inputs(student, student, batch)
    predict_only = testing.build_loss("step_by_step", alpha=1.0)(inputs)
    explain_only = testing.build_loss("step_by_step", alpha=0.0)(inputs)
    half = testing.build_loss("step_by_step", alpha=0.5)(inputs)
    ce_p, ce_e = predict_only[1]["ce_predict"].item(), predict_only[1]["ce_explain"].item()
    assert predict_only[0].item() == pytest.approx(ce_p)
    assert explain_only[0].item() == pytest.approx(ce_e)
    assert half[0].item() == pytest.approx(0.5 * ce_p + 0.5 * ce_e)
    # each term depends only on its own rows
    changed = student.copy()
    changed[1] += rng.standard_normal((L, V)).astype(np.float32) * 5  # an explain row
    again = testing.build_loss("step_by_step", alpha=1.0)(_inputs(changed, changed, batch))
    assert again[0].item() == pytest.approx(ce_p)
    assert again[1]["ce_explain"].item() != pytest.approx(ce_e)


def test_step_by_step_needs_task_rows():
    rng = np.random.default_rng(0)
    batch = testing.default_batch(1, 3, 5, np.ones((1, 3), np.float32), rng)
    logits = rng.standard_normal((1, 3, 5)).astype(np.float32)
    with pytest.raises(KeyError, match="predict"):
        testing.build_loss("step_by_step")(_inputs(logits, logits, batch))
    with pytest.raises(Exception, match="alpha"):
        testing.build_loss("step_by_step", alpha=1.5)
