"""Every component of the plugin through the conformance kit of its kind."""

from __future__ import annotations

import pytest

from kdcore import app, testing


@pytest.mark.parametrize(
    "params",
    [{}, {"temperature": 2.5}, {"temperature": 0.5, "l2": 0.1}],
    ids=["T1", "T2.5", "T0.5"],
)
def test_amtml_loss_conforms(params):
    testing.check_loss("amtml", **params)


@pytest.mark.parametrize(
    "params",
    [
        {"student_dim": 8, "teacher_dims": [8], "student_layers": [1, 3], "teacher_layers": [2, 3]},
        {
            "student_dim": 8,
            "teacher_dims": [8],
            "student_layers": [2],
            "teacher_layers": [-1],
            "normalize": False,
        },
    ],
    ids=["normalized", "raw"],
)
def test_hint_conforms(params):
    testing.check_loss("hint", **params)


@pytest.mark.parametrize("mode", ["kl", "mse"])
def test_attention_transfer_conforms(mode):
    testing.check_loss("attention_transfer", mode=mode)


@pytest.mark.parametrize("over", ["tokens", "sequences"])
def test_cka_conforms(over):
    testing.check_loss("cka", over=over)


@pytest.mark.parametrize(
    "params",
    [
        {"input_dim": 8},
        {"input_dim": 8, "pooling": "max", "detach": False},
        {"scorer": "attention", "heads": 2, "input_dim": 8},
        {
            "scorer": "attention",
            "heads": 4,
            "keys": "teacher_features",
            "input_dim": 8,
            "teacher_dims": [8, 8, 8],
        },
        {"source": "teacher_hidden", "teacher_dims": [8, 8, 8]},
    ],
    ids=["latent", "latent-max", "attention", "attention-teacher-keys", "teacher-source"],
)
def test_amtml_aggregator_conforms(params):
    testing.check_aggregator("amtml", **params)


def test_amtml_aggregator_logit_source():
    """student_logits needs the vocabulary width up front, which the kit draws at random;
    check the same contracts on fixed-vocabulary inputs."""
    import mlx.core as mx
    import numpy as np

    import kdcore
    from kdcore import ModelOutput, Setup

    V = 12
    aggregate = app.build(
        "teacher_aggregator", "amtml", Setup(num_teachers=3), source="student_logits", input_dim=V
    )
    assert aggregate.requires == frozenset()
    rng = np.random.default_rng(0)
    for B, L in [(1, 1), (3, 5)]:
        signals = [
            kdcore.TeacherSignal(vocab_size=V, logits=mx.array(rng.standard_normal((B, L, V)) * 5))
            for _ in range(3)
        ]
        student = ModelOutput(logits=mx.array(rng.standard_normal((B, L, V)).astype(np.float32)))
        batch = {"mask": mx.ones((B, L))}
        out = aggregate(signals, kdcore.LossInputs(student=student, teacher=None, batch=batch))
        assert np.allclose(np.array(mx.exp(out.log_probs(2.0)).sum(-1)), 1.0, atol=1e-4)
        w = np.array(out.weights)
        assert w.shape == (B, 3) and np.all(w >= 0) and np.allclose(w.sum(-1), 1.0, atol=1e-5)
