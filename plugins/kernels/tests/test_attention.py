"""The flash attention primitive itself: every instruction set and thread count (the backward
split by key tiles when there are fewer KV heads than threads), inputs read through their
strides (a transposed q, keys sliced from a larger cache buffer, a row whose elements are
not adjacent), its checks on shapes, and what it holds: forward and backward never keep
the [B, heads, L, S] scores (tests/test_flash_attention.py checks values and gradients
against MLX across shapes, and models through kdcore.models.ops)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

kd_kernels = pytest.importorskip("kd_kernels")
if kd_kernels.unavailable_reason() is not None:
    pytest.skip(kd_kernels.unavailable_reason(), allow_module_level=True)

_ext = kd_kernels._ext


def _inputs(B, heads, kv_heads, L, S, D, seed=0):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((B, heads, L, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, kv_heads, S, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, kv_heads, S, D)).astype(np.float32))
    cotangent = mx.array(rng.standard_normal((B, heads, L, D)).astype(np.float32))
    return q, k, v, cotangent


def _value_and_grads(q, k, v, cotangent, scale=0.125, causal=True):
    def loss(q, k, v):
        return (_ext.flash_attention(q, k, v, scale, causal) * cotangent).sum()

    out = _ext.flash_attention(q, k, v, scale, causal)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    mx.eval(out, grads)
    return [np.array(x) for x in (out, *grads)]


def _reference(q, k, v, cotangent, scale=0.125, causal=True):
    groups = q.shape[1] // k.shape[1]

    def attend(q, k, v):
        k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
        scores = (q * scale) @ k.swapaxes(-1, -2)
        if causal:
            L, S = q.shape[2], k.shape[2]
            scores = mx.where(mx.arange(S)[None] <= mx.arange(L)[:, None] + S - L, scores, -mx.inf)
        return mx.softmax(scores, axis=-1, precise=True) @ v

    grads = mx.grad(lambda q, k, v: (attend(q, k, v) * cotangent).sum(), argnums=(0, 1, 2))(q, k, v)
    return [np.array(x) for x in (attend(q, k, v), *grads)]


def _close(got, want, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{what}: {name}")


def test_every_instruction_set_gives_the_same_attention():
    inputs = _inputs(2, 6, 2, 97, 97, 40, seed=1)
    want = _reference(*inputs)
    isa = _ext.isa()
    try:
        for name in _ext.isas():
            _ext.set_isa(name)
            _close(_value_and_grads(*inputs), want, name)
    finally:
        _ext.set_isa(isa)


@pytest.mark.parametrize("B,kv_heads", [(2, 3), (1, 1)])
def test_thread_counts_give_the_same_attention(B, kv_heads):
    # (1, 1): one KV head for up to 4 threads, its backward split by key tiles and the
    # splits' dq summed; (2, 3): a task per KV head, the same sums in the same order
    inputs = _inputs(B, 3 * kv_heads, kv_heads, 200, 200, 32, seed=2)
    want = _reference(*inputs)
    before = _ext.threads()
    try:
        results = {}
        for n in (1, 2, 4):
            _ext.set_threads(n)
            results[n] = _value_and_grads(*inputs)
            _close(results[n], want, f"{n} threads")
    finally:
        _ext.set_threads(before)
    np.testing.assert_array_equal(results[1][0], results[4][0])  # the forward: one row, one task
    if B * kv_heads >= 4:
        for a, b in zip(results[1], results[4]):
            np.testing.assert_array_equal(a, b)


def test_views_are_read_through_their_strides():
    rng = np.random.default_rng(3)
    B, heads, kv_heads, L, D = 2, 4, 2, 70, 24
    # q as mlx-lm makes it ([B, L, heads, D] transposed), keys and values the first 75 rows of
    # a cache buffer of 128, and a v whose rows' elements are not adjacent (a swapped axis)
    q = mx.array(rng.standard_normal((B, L, heads, D)).astype(np.float32)).transpose(0, 2, 1, 3)
    k = mx.array(rng.standard_normal((B, kv_heads, 128, D)).astype(np.float32))[:, :, :75]
    v = mx.array(rng.standard_normal((B, kv_heads, D, 75)).astype(np.float32)).swapaxes(2, 3)
    cotangent = mx.array(rng.standard_normal((B, heads, L, D)).astype(np.float32))
    got = _value_and_grads(q, k, v, cotangent)
    dense = [mx.array(np.array(x)) for x in (q, k, v)]
    want = _value_and_grads(*dense, cotangent)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    _close(got, _reference(*dense, cotangent), "views")


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,causal,message",
    [
        ((2, 4, 8, 16), (2, 3, 8, 16), (2, 3, 8, 16), True, "multiple of the KV heads"),
        ((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 9, 16), True, "k and v differ"),
        ((2, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16), True, "batch or width"),
        ((2, 4, 8, 16), (2, 2, 8, 12), (2, 2, 8, 12), True, "batch or width"),
        ((2, 4, 9, 16), (2, 2, 8, 16), (2, 2, 8, 16), True, "at least as many keys"),
        ((4, 8, 16), (2, 8, 16), (2, 8, 16), True, r"\[B, heads, L, D\]"),
    ],
)
def test_bad_shapes_are_refused_by_name(q_shape, k_shape, v_shape, causal, message):
    with pytest.raises(ValueError, match=f"kd_kernels: .*{message}"):
        _ext.flash_attention(mx.zeros(q_shape), mx.zeros(k_shape), mx.zeros(v_shape), 1.0, causal)


def test_forward_and_backward_never_hold_the_scores():
    B, heads, L, D = 1, 4, 1024, 32
    q, k, v, cotangent = _inputs(B, heads, heads, L, L, D, seed=4)
    scores = B * heads * L * L * 4  # one [B, heads, L, L] float32 array: 16 MiB

    def peak(attend):
        def loss(q, k, v):
            return (attend(q, k, v) * cotangent).sum()

        grad = mx.grad(loss, argnums=(0, 1, 2))
        mx.eval(grad(q, k, v))  # warm: MLX's buffer cache
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(grad(q, k, v))
        return mx.get_peak_memory() - base

    flash = peak(lambda q, k, v: _ext.flash_attention(q, k, v, 0.125, True))
    mlx = peak(
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    )
    assert mlx > scores, f"MLX's attention held {mlx} bytes, expected the scores at least"
    # q, k, v, the output, their gradients and the backward's packed q and dO: 0.5 MiB each
    assert flash < scores / 2, f"flash attention held {flash} bytes"
