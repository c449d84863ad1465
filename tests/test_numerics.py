"""Log-softmax at large logits: every place that forms one subtracts the row maximum first.

``z - logsumexp(z)`` with ``z`` near 1e4 leaves float32 an ulp of ~1e-3 for the difference,
so probabilities were off by 0.05% (a teacher's summed to 1.000465). Every reference here is
float64 NumPy on the same float32 inputs, so only the arithmetic is compared."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import kdcore
from kdcore import TeacherSignal, log_softmax, testing, token_cross_entropy

V = 64


def _logits(offset: float, seed: int, shape=(2, 5, V)) -> np.ndarray:
    """Logits within a few units of ``offset``: many tokens share the mass."""
    rng = np.random.default_rng(seed)
    return (offset - np.abs(rng.standard_normal(shape)) * 3.0).astype(np.float32)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_forward_kl(s: np.ndarray, t: np.ndarray) -> float:
    lq, lp = np_log_softmax(s), np_log_softmax(t)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


OFFSETS = [1e4, -1e4, 3e4]


@pytest.mark.parametrize("offset", OFFSETS)
def test_teacher_log_probs_are_a_distribution_at_large_logits(offset):
    logits = _logits(offset, 0)
    signal = TeacherSignal(vocab_size=V, logits=mx.array(logits))
    for temperature in (1.0, 2.0):
        lp = np.array(signal.log_probs(temperature), dtype=np.float64)
        np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=2e-6)
        np.testing.assert_allclose(lp, np_log_softmax(logits / temperature), atol=2e-6)


@pytest.mark.parametrize("offset", OFFSETS)
def test_log_softmax_and_cross_entropy_at_large_logits(offset):
    logits = _logits(offset, 1)
    got = np.array(log_softmax(mx.array(logits), 1.0), dtype=np.float64)
    np.testing.assert_allclose(got, np_log_softmax(logits), atol=2e-6)
    labels = np.random.default_rng(2).integers(0, V, logits.shape[:2]).astype(np.int32)
    ce = np.array(token_cross_entropy(mx.array(logits), mx.array(labels)), dtype=np.float64)
    ref = -np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, ref, atol=5e-6)
    # The gradient still sums to zero per row (the subtracted maximum carries none).
    grad = mx.grad(lambda z: log_softmax(z, 1.0)[..., 0].sum())(mx.array(logits))
    np.testing.assert_allclose(np.array(grad).sum(-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "gjsd"])
def test_dense_kernels_at_large_logits(kind):
    s, t = _logits(1e4, 3), _logits(-1e4, 4)
    mask = mx.ones(s.shape[:2])
    ref_kl = np_forward_kl(s, t)
    fast = testing.dense_divergence(mx.array(s), mx.array(t), mask, kind).item()
    plain = kdcore.kernels.divergence.plain_divergence(mx.array(s), mx.array(t), mask, kind).item()
    assert fast == pytest.approx(plain, abs=2e-6)
    if kind == "forward_kl":
        assert fast == pytest.approx(ref_kl, abs=5e-6)


def test_sparse_tail_bucket_kernel_at_large_logits():
    s, t = _logits(1e4, 5), _logits(2e4, 6)
    teacher = TeacherSignal(vocab_size=V, logits=mx.array(t))
    ids, lp = kdcore.teacher_support(teacher, 1.0, "tail-bucket", top_k=8)
    lp = np.array(lp, dtype=np.float64)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=2e-6)
    mask = mx.ones(s.shape[:2])
    got = testing.sparse_divergence(
        mx.array(s), ids, mx.array(lp.astype(np.float32)), mask, tail="tail-bucket"
    ).item()
    # float64 reference: KL over the top-8 ids plus one tail class
    lq = np_log_softmax(s)
    ids_np = np.array(ids)
    q_top = np.take_along_axis(np.exp(lq), ids_np, -1)
    q = np.concatenate([q_top, 1.0 - q_top.sum(-1, keepdims=True)], -1)
    p = np.exp(lp)
    assert got == pytest.approx(float((p * (np.log(p) - np.log(q))).sum(-1).mean()), abs=5e-6)
