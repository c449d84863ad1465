"""The layer kernels (kd-kernels' flash attention, attention softmax and SwiGLU, through
kdcore.models.ops) against pure MLX: values and gradients, causal masks, grouped heads, odd
lengths, a cache offset, and whole models (mlx-lm's llama, qwen3 and gemma3 layers, the
built-in transformer) with and without them. Attention is checked on both native paths:
flash attention, and the native softmax between matrix products (the path of a single
query, and of a registry without the flash kernel). tests/test_flash_attention.py checks
the flash kernel itself in more detail."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore.kernels.native import install_registered_kernels, native_kernel, use_row_kernels
from kdcore.models import ops
from kdcore.models.mlxlm import build_mlxlm
from kdcore.models.transformer import Transformer, TransformerConfig


@pytest.fixture
def kernels():
    previous = install_registered_kernels()
    assert native_kernel("softmax") is not None and native_kernel("swiglu") is not None, (
        "kd-kernels' layer kernels are not installed"
    )
    yield
    use_row_kernels(previous)


@pytest.fixture(params=["flash", "softmax"])
def attention_path(request, kernels, monkeypatch):
    """The attention kernel ops.attention runs: flash attention, or (no flash kernel) the
    native softmax; the name of the one to count in ops."""
    assert ops._flash is not None, "kd-kernels' flash attention is not installed"
    if request.param == "softmax":
        monkeypatch.setattr(ops, "_flash", None)
        return "_softmax"
    return "_flash"


def _pure(fn):
    saved = ops.use_layer_kernels(None, None, None)
    try:
        return fn()
    finally:
        ops.use_layer_kernels(*saved)


@pytest.mark.parametrize(
    "B,heads,kv_heads,L,S,D,mask",
    [
        (2, 4, 4, 17, 17, 8, "causal"),  # odd length, no grouping
        (1, 9, 3, 33, 33, 64, "causal"),  # SmolLM2's grouping, odd length
        (2, 4, 2, 5, 12, 16, "causal"),  # a cache: 5 new queries after 7 held keys
        (1, 2, 1, 1, 9, 8, "causal"),  # one new token
        (2, 4, 2, 7, 11, 8, None),  # no mask
        (1, 9, 3, 300, 300, 16, "causal"),  # query blocks (ops.CAUSAL_BLOCK_ROWS), a short last
        (1, 4, 2, 260, 270, 8, "causal"),  # query blocks after 10 held keys
    ],
)
def test_attention_equals_mlx_in_value_and_gradient(
    attention_path, B, heads, kv_heads, L, S, D, mask
):
    rng = np.random.default_rng(L * 100 + S)
    q = mx.array(rng.standard_normal((B, heads, L, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, kv_heads, S, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, kv_heads, S, D)).astype(np.float32))
    cotangent = mx.array(rng.standard_normal((B, heads, L, D)).astype(np.float32))
    scale = D**-0.5

    def f(q, k, v):
        return (ops.attention(q, k, v, scale, mask) * cotangent).sum()

    def reference(q, k, v):
        return (
            mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask) * cotangent
        ).sum()

    value, grads = mx.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    want, want_grads = mx.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    assert value.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-4)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)


def test_the_causal_softmax_gives_masked_keys_exactly_zero(kernels):
    x = mx.array(np.random.default_rng(0).standard_normal((3, 6, 6)).astype(np.float32))
    y = np.array(native_kernel("softmax")(x, 0.5, True))
    assert (np.triu(np.ones((6, 6)), k=1)[None] * y == 0).all()
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(7,), (3, 129), (2, 5, 33)])
def test_swiglu_equals_mlx_in_value_and_gradient(kernels, shape):
    rng = np.random.default_rng(len(shape))
    gate = mx.array((rng.standard_normal(shape) * 6).astype(np.float32))  # saturated too
    up = mx.array(rng.standard_normal(shape).astype(np.float32))
    cotangent = mx.array(rng.standard_normal(shape).astype(np.float32))

    def f(gate, up):
        return (ops.swiglu(gate, up) * cotangent).sum()

    def reference(gate, up):
        return ((nn.silu(gate) * up) * cotangent).sum()

    value, grads = mx.value_and_grad(f, argnums=(0, 1))(gate, up)
    want, want_grads = mx.value_and_grad(reference, argnums=(0, 1))(gate, up)
    assert value.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-6)


LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
MODELS = {
    "llama": LLAMA,
    "qwen3": {**LLAMA, "model_type": "qwen3", "head_dim": 16, "max_position_embeddings": 64},
    "gemma3": {
        **LLAMA,
        "model_type": "gemma3_text",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
    },
}


def _loss_and_grads(model, ids):
    def loss(model):
        return model(ids).astype(mx.float32).square().mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, grads)
    return value.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mlx_lm_layers_run_the_kernels_to_the_same_loss_and_gradients(
    attention_path, name, monkeypatch
):
    calls = []
    kernel = getattr(ops, attention_path)
    monkeypatch.setattr(ops, attention_path, lambda *a: calls.append(1) or kernel(*a))
    mx.random.seed(0)
    model = build_mlxlm(MODELS[name])
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(1).integers(0, 97, (2, 19)))
    got, grads = _loss_and_grads(model, ids)
    assert calls, f"{name}: the native {attention_path} never ran"
    want, want_grads = _pure(lambda: _loss_and_grads(model, ids))
    assert got == pytest.approx(want, rel=1e-5)
    for key, expected in want_grads.items():
        np.testing.assert_allclose(
            np.array(grads[key]), np.array(expected), rtol=1e-3, atol=1e-6, err_msg=key
        )


def test_the_builtin_transformer_runs_the_kernels_to_the_same_loss_and_gradients(
    attention_path, monkeypatch
):
    calls = []
    kernel = getattr(ops, attention_path)
    monkeypatch.setattr(ops, attention_path, lambda *a: calls.append(1) or kernel(*a))
    mx.random.seed(0)
    model = Transformer(TransformerConfig(vocab_size=97, dim=32, layers=2, heads=4, kv_heads=2))
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(2).integers(0, 97, (2, 23)))

    def loss_and_grads():
        def loss(model):
            return model(ids).logits.square().mean()

        value, grads = nn.value_and_grad(model, loss)(model)
        mx.eval(value, grads)
        return value.item(), dict(tree_flatten(grads))

    got, grads = loss_and_grads()
    assert calls, f"the native {attention_path} never ran"
    want, want_grads = _pure(loss_and_grads)
    assert got == pytest.approx(want, rel=1e-5)
    for key, expected in want_grads.items():
        np.testing.assert_allclose(
            np.array(grads[key]), np.array(expected), rtol=1e-3, atol=1e-6, err_msg=key
        )


def test_the_patch_covers_the_checked_mlx_lm_only(monkeypatch):
    import mlx_lm

    assert mlx_lm.__version__ in ops.CHECKED_MLX_LM, (
        f"mlx-lm {mlx_lm.__version__}: check kdcore.models.ops against it, then add it"
    )
    assert {"llama", "qwen3", "gemma3_text"} <= set(ops.patch_mlx_lm())
    import mlx_lm.models.llama as llama

    assert llama.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    assert llama.scaled_dot_product_attention.__module__ == "kdcore.models.ops"
