"""Every built-in component passes the conformance kit; scheduler and aggregator maths."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore import app, testing
from kdcore.losses.tokens import token_cross_entropy
from kdcore.signal.mixture import mixture
from kdcore.signal.teacher import TeacherSignal


def test_ce_conforms():
    testing.check_loss("ce")
    testing.check_loss("ce", label_smoothing=0.1)


@pytest.mark.parametrize(
    "name, params",
    [
        ("constant", {"value": 2.0}),
        ("linear", {"start": 0.0, "end": 1.0}),
        ("cosine", {"start": 4.0, "end": 1.0}),
        ("cosine", {"start": 1.0, "end": 0.0, "warmup": 10, "warmup_start": 0.0}),
        ("exponential", {"start": 1.0, "end": 0.01}),
        ("step", {"start": 1.0, "gamma": 0.5, "every": 10}),
        ("step", {"start": 1.0, "gamma": 0.5, "milestones": [30, 60]}),
    ],
)
def test_schedulers_conform(name, params):
    testing.check_scheduler(name, **params)


def test_scheduler_values_match_their_formulas():
    cos = app.build("scheduler", "cosine", start=4.0, end=1.0)
    assert cos(50, 100) == pytest.approx(1.0 + 3.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    exp = app.build("scheduler", "exponential", start=1.0, end=0.01)
    assert exp(50, 100) == pytest.approx(0.1)
    step = app.build("scheduler", "step", start=1.0, gamma=0.5, milestones=[30, 60])
    assert [step(s, 100) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    warm = app.build("scheduler", "linear", start=1.0, end=0.0, warmup=10)
    assert warm(5, 110) == pytest.approx(0.5) and warm(10, 110) == pytest.approx(1.0)
    assert warm(110, 110) == pytest.approx(0.0)


def test_aggregators_conform():
    testing.check_aggregator("mean")
    testing.check_aggregator("weighted", weights=[1.0, 3.0, 0.0])
    testing.check_aggregator("weighted", learnable=True)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 4.0))
def test_mean_is_the_average_of_probabilities_not_logits(seed, temperature):
    rng = np.random.default_rng(seed)
    z = [rng.standard_normal((2, 3, 7)).astype(np.float32) * 3 for _ in range(2)]
    signals = [TeacherSignal(vocab_size=7, logits=mx.array(x)) for x in z]
    out = app.build("teacher_aggregator", "mean")(signals)

    def softmax(x):
        e = np.exp(x / temperature - (x / temperature).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = 0.5 * softmax(z[0].astype(np.float64)) + 0.5 * softmax(z[1].astype(np.float64))
    np.testing.assert_allclose(np.exp(np.array(out.log_probs(temperature))), expected, atol=1e-5)


def test_one_teacher_passes_through():
    sig = TeacherSignal(vocab_size=3, logits=mx.zeros((1, 2, 3)))
    assert mixture([sig], mx.ones((1, 1))) is sig


def test_learnable_weights_get_gradients():
    import mlx.nn as nn

    agg = app.build("teacher_aggregator", "weighted", kdcore.Setup(num_teachers=2), learnable=True)
    signals = [
        TeacherSignal(vocab_size=4, logits=mx.array(np.eye(4, dtype=np.float32)[None] * 5)),
        TeacherSignal(vocab_size=4, logits=mx.zeros((1, 4, 4))),
    ]
    labels = mx.array([[0, 1, 2, 3]])

    def nll(module):
        lp = module(signals).log_probs(1.0)
        return -mx.take_along_axis(lp, labels[..., None], -1).mean()

    grads = nn.value_and_grad(agg, nll)(agg)[1]
    g = np.array(grads["logits"])
    assert g[0] < 0 < g[1]  # the teacher that predicts the labels gains weight


def test_sparse_signal_retempering_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 2, 50)) * 3
    Tc, T, k = 2.0, 0.7, 50
    logp = z / Tc - np.log(np.exp(z / Tc).sum(-1, keepdims=True))
    order = np.argsort(-logp, -1)[..., :k]
    sig = TeacherSignal(
        vocab_size=50,
        topk_ids=mx.array(order.astype(np.int32)),
        topk_logprobs=mx.array(np.take_along_axis(logp, order, -1).astype(np.float32)),
        tail_logmass=mx.full((1, 2), -80.0),
        capture_temperature=Tc,
    )
    _, out = sig.sparse_log_probs(T, "renormalize")
    ref = z / T - np.log(np.exp(z / T).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.array(out), np.take_along_axis(ref, order, -1), atol=1e-4)


def test_token_cross_entropy_ignores_ignore_index():
    logits = mx.array(np.random.default_rng(0).standard_normal((1, 3, 5)).astype(np.float32))
    labels = mx.array([[1, -100, 4]])
    ce = np.array(token_cross_entropy(logits, labels))
    assert ce[0, 1] == 0.0 and ce[0, 0] > 0 and ce[0, 2] > 0
