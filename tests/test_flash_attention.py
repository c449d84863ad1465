"""kd-kernels' flash attention (the ``"attention"`` layer kernel) against attention written
out in MLX: values and gradients (dq, dk, dv) at odd lengths around its 64-row tiles,
grouped heads, odd head widths, a query block at the end of longer keys, no mask; and a
small llama through mlx-lm's patched layers, with and without the kernel: logits and
gradients in training, and generation through a KV cache (whose keys the kernel reads as
views of the cache's buffers)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore.kernels.native import install_registered_kernels, native_kernel, use_row_kernels
from kdcore.models import ops
from kdcore.models.mlxlm import build_mlxlm


@pytest.fixture
def flash():
    previous = install_registered_kernels()
    kernel = native_kernel("attention")
    assert kernel is not None and ops._flash is not None, (
        "kd-kernels' flash attention is not installed"
    )
    yield kernel
    use_row_kernels(previous)


def reference(q, k, v, scale: float, causal: bool) -> mx.array:
    """softmax(scale q k^T + mask) v, the KV heads repeated for their query heads; query i
    is position i + S - L."""
    groups = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if causal:
        L, S = q.shape[2], k.shape[2]
        seen = mx.arange(S)[None] <= mx.arange(L)[:, None] + (S - L)
        scores = mx.where(seen, scores, -mx.inf)
    return mx.softmax(scores, axis=-1, precise=True) @ v


def _compare(fn, B, heads, kv_heads, L, S, D, causal):
    rng = np.random.default_rng(1000 * L + 10 * S + D)
    q = mx.array(rng.standard_normal((B, heads, L, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, kv_heads, S, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, kv_heads, S, D)).astype(np.float32))
    cotangent = mx.array(rng.standard_normal((B, heads, L, D)).astype(np.float32))
    scale = D**-0.5

    def loss(attend):
        return lambda q, k, v: (attend(q, k, v, scale, causal) * cotangent).sum()

    out, want = fn(q, k, v, scale, causal), reference(q, k, v, scale, causal)
    np.testing.assert_allclose(np.array(out), np.array(want), rtol=1e-4, atol=1e-5)
    grads = mx.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    want_grads = mx.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, got, expected in zip("qkv", grads, want_grads):
        assert got.shape == expected.shape
        np.testing.assert_allclose(
            np.array(got), np.array(expected), rtol=1e-4, atol=1e-5, err_msg=f"d{name}"
        )


@pytest.mark.parametrize("D", [64, 48, 80])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("L", [1, 7, 63, 65, 130, 257])
def test_causal_flash_attention_equals_mlx_in_value_and_gradient(flash, L, groups, D):
    _compare(flash, 2, 2 * groups, 2, L, L, D, causal=True)


@pytest.mark.parametrize(
    "L,S,causal",
    [
        (1, 9, True),  # one query after 8 held keys
        (5, 70, True),  # a query block whose keys span two tiles
        (65, 130, True),  # query and key tiles out of step
        (64, 200, True),
        (100, 101, True),
        (7, 11, False),  # no mask
        (130, 65, False),  # more queries than keys
    ],
)
def test_queries_at_the_end_of_longer_keys_and_no_mask(flash, L, S, causal):
    _compare(flash, 2, 6, 2, L, S, 16, causal)


def test_causal_attention_needs_as_many_keys_as_queries(flash):
    q = mx.zeros((1, 2, 9, 8))
    k = mx.zeros((1, 2, 8, 8))
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        flash(q, k, k, 1.0, True)


LLAMA = dict(
    model_type="llama",
    hidden_size=96,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=101,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def _pure(fn):
    saved = ops.use_layer_kernels(None, None, None)
    try:
        return fn()
    finally:
        ops.use_layer_kernels(*saved)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    kernel = ops._flash
    monkeypatch.setattr(ops, "_flash", lambda *a: calls.append(a[0].shape[2]) or kernel(*a))
    return calls


def test_a_llama_gives_the_same_logits_and_gradients_with_and_without_the_kernel(
    flash, monkeypatch
):
    mx.random.seed(3)
    model = build_mlxlm(LLAMA)
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(4).integers(0, 101, (2, 70)))

    def run():
        def loss(model):
            return model(ids).square().mean()

        logits = model(ids)
        value, grads = nn.value_and_grad(model, loss)(model)
        mx.eval(logits, value, grads)
        return np.array(logits), value.item(), dict(tree_flatten(grads))

    calls = _counting(monkeypatch)
    logits, value, grads = run()
    assert calls and set(calls) == {70}, "the flash kernel did not run in every layer"
    want_logits, want, want_grads = _pure(run)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
    assert value == pytest.approx(want, rel=1e-5)
    assert set(grads) == set(want_grads)
    for key, expected in want_grads.items():
        np.testing.assert_allclose(
            np.array(grads[key]), np.array(expected), rtol=1e-3, atol=1e-6, err_msg=key
        )


def test_generation_through_a_kv_cache_gives_the_same_logits(flash, monkeypatch):
    from mlx_lm.models.cache import make_prompt_cache

    mx.random.seed(5)
    model = build_mlxlm(LLAMA)
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(6).integers(0, 101, (1, 50)))

    def generate():
        # a prompt in two chunks (the second: 7 queries after 40 cached keys), then three
        # decoding steps of one token (no mask: the native softmax's path)
        cache = make_prompt_cache(model)
        out = [model(ids[:, :40], cache=cache), model(ids[:, 40:47], cache=cache)]
        for t in range(47, 50):
            out.append(model(ids[:, t : t + 1], cache=cache))
        mx.eval(out)
        return np.concatenate([np.array(x) for x in out], axis=1)

    calls = _counting(monkeypatch)
    got = generate()
    assert {40, 7} <= set(calls) and 1 not in calls
    want = _pure(generate)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    whole = np.array(model(ids))  # the same positions in one causal pass
    np.testing.assert_allclose(got, whole, rtol=1e-4, atol=1e-4)
