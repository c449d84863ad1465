"""A mixture of top-k teachers (several cached teachers under mean / weighted)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcore.kernels.support import _distinct_support, mixture_support
from kdcore.losses.rows import token_divergence
from kdcore.signal.teacher import TeacherSignal


def log_softmax64(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def top_k_signal(logits: np.ndarray, k: int, capture: float = 1.0) -> TeacherSignal:
    """What the cache stores for ``logits``: top-k log-probs at ``capture`` and the tail."""
    lp = log_softmax64(logits / capture)
    ids = np.argsort(-lp, axis=-1)[..., :k]
    top = np.take_along_axis(lp, ids, -1)
    tail = np.log(np.maximum(1.0 - np.exp(top).sum(-1), 1e-30))
    return TeacherSignal(
        vocab_size=logits.shape[-1],
        topk_ids=mx.array(ids.astype(np.int32)),
        topk_logprobs=mx.array(top.astype(np.float32)),
        tail_logmass=mx.array(tail.astype(np.float32)),
        capture_temperature=capture,
    )


def spread_reference(logits: np.ndarray, k: int) -> np.ndarray:
    """float64 dense p with the top-k kept and the tail spread evenly over the other ids."""
    p = np.exp(log_softmax64(logits))
    ids = np.argsort(-p, axis=-1)[..., :k]
    top = np.take_along_axis(p, ids, -1)
    vocab = logits.shape[-1]
    out = np.repeat(((1.0 - top.sum(-1)) / (vocab - k))[..., None], vocab, axis=-1)
    np.put_along_axis(out, ids, top, -1)
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ks=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    per_token=st.booleans(),
)
def test_mixture_support_matches_float64(seed, ks, per_token):
    rng = np.random.default_rng(seed)
    B, L, V = 2, 3, 24
    # a shared component makes the members' top-k overlap, so repeats occur
    shared = rng.standard_normal((B, L, V)) * 2
    logits = [shared + rng.standard_normal((B, L, V)) for _ in ks]
    raw = rng.random((B, L, len(ks)) if per_token else (B, len(ks))) + 0.1
    weights = raw / raw.sum(-1, keepdims=True)
    signal = TeacherSignal(
        vocab_size=V,
        members=tuple(top_k_signal(z, k) for z, k in zip(logits, ks)),
        weights=mx.array(weights.astype(np.float32)),
    )
    w = weights if per_token else np.repeat(weights[:, None, :], L, axis=1)
    dense = sum(
        w[..., m, None] * spread_reference(z, k) for m, (z, k) in enumerate(zip(logits, ks))
    )

    ids, lp = mixture_support(signal, 1.0, "tail-bucket")
    ids = np.array(ids)
    assert ids.shape == (B, L, min(sum(ks), V))  # all of V once the members' k add up to it
    union = [
        set(np.array(m.topk_ids)[b, t]) for m in signal.members for b in range(B) for t in range(L)
    ]
    for b in range(B):
        for t in range(L):
            row = ids[b, t]
            assert len(set(row)) == len(row)  # distinct
            for m in range(len(ks)):
                assert union[m * B * L + b * L + t] <= set(row)  # holds every member's top-k
    lp = np.array(lp, dtype=np.float64)
    want = np.take_along_axis(dense, ids, -1)
    np.testing.assert_allclose(np.exp(lp[..., :-1]), want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(lp[..., -1]), 1 - want.sum(-1), rtol=1e-4, atol=1e-6)

    _, renorm = mixture_support(signal, 1.0, "renormalize")
    np.testing.assert_allclose(
        np.exp(np.array(renorm, dtype=np.float64)),
        want / want.sum(-1, keepdims=True),
        rtol=2e-5,
        atol=1e-7,
    )


def test_full_vocabulary_members_give_the_exact_dense_mixture():
    rng = np.random.default_rng(0)
    B, L, V = 2, 4, 16
    logits = [rng.standard_normal((B, L, V)) * 2 for _ in range(2)]
    weights = mx.array([[0.3, 0.7], [0.5, 0.5]], dtype=mx.float32)
    sparse = TeacherSignal(
        vocab_size=V, members=tuple(top_k_signal(z, V) for z in logits), weights=weights
    )
    dense = TeacherSignal(
        vocab_size=V,
        members=tuple(
            TeacherSignal(vocab_size=V, logits=mx.array(z.astype(np.float32))) for z in logits
        ),
        weights=weights,
    )
    student = mx.array(rng.standard_normal((B, L, V)).astype(np.float32))
    mask = mx.ones((B, L))
    for tail in ("renormalize", "tail-bucket"):
        got = token_divergence(student, sparse, mask, temperature=2.0, tail=tail)
        want = token_divergence(student, dense, mask, temperature=2.0)
        np.testing.assert_allclose(got.item(), want.item(), rtol=1e-5)


def test_gradient_reaches_learnable_weights_through_a_sparse_mixture():
    rng = np.random.default_rng(1)
    B, L, V = 2, 3, 20
    members = tuple(top_k_signal(rng.standard_normal((B, L, V)) * 2, 5) for _ in range(2))
    student = mx.array(rng.standard_normal((B, L, V)).astype(np.float32))

    def loss(free):
        weights = mx.broadcast_to(mx.softmax(free)[None], (B, 2))
        signal = TeacherSignal(vocab_size=V, members=members, weights=weights)
        return token_divergence(student, signal, mx.ones((B, L)), tail="tail-bucket")

    free = mx.array([0.2, -0.1])
    grad = mx.grad(loss)(free)
    eps = 1e-2
    numeric = [
        (loss(free + eps * mx.array(e)) - loss(free - eps * mx.array(e))).item() / (2 * eps)
        for e in ([1.0, 0.0], [0.0, 1.0])
    ]
    assert abs(numeric[0]) > 1e-4
    np.testing.assert_allclose(np.array(grad), numeric, rtol=2e-2, atol=1e-5)


def test_distinct_support_replaces_repeats_with_ids_outside_the_row():
    ids = np.array([[3, 1, 3, 1, 0], [4, 5, 6, 7, 8]])
    out = _distinct_support(ids, vocab=10)
    assert out[1].tolist() == [4, 5, 6, 7, 8]
    assert out[0, [0, 1, 4]].tolist() == [3, 1, 0]  # first occurrences stay in place
    assert sorted(out[0]) == [0, 1, 2, 3, 4]  # repeats took the smallest free ids, 2 and 4


def test_a_mixture_of_a_dense_and_a_cached_teacher():
    rng = np.random.default_rng(2)
    B, L, V = 1, 2, 12
    z0, z1 = (rng.standard_normal((B, L, V)) for _ in range(2))
    signal = TeacherSignal(
        vocab_size=V,
        members=(
            top_k_signal(z0, 4),
            TeacherSignal(vocab_size=V, logits=mx.array(z1.astype(np.float32))),
        ),
        weights=mx.array([[0.5, 0.5]], dtype=mx.float32),
    )
    ids, lp = mixture_support(signal, 1.0, "tail-bucket")
    assert ids.shape == (B, L, 8)  # the dense member contributes its top-4
    assert np.exp(np.array(lp, dtype=np.float64)).sum(-1) == pytest.approx(1.0, abs=1e-5)
