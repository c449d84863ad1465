"""The layer operations a plugin may run natively: attention and SwiGLU.

MLX's Linux CPU backend runs exp, sigmoid and softmax as scalar code on one core: at a real
model's shape most of a layer's time is the ``[B, heads, L, L]`` softmax and
``silu(gate) * up``, not its matrix products (docs/performance.md, ``real_model``). A
plugin registers native kernels for them through ``kd_row_kernels`` (names ``"softmax"``,
``"swiglu"`` and ``"attention"``; kd-kernels does) and the engine installs them here
(:func:`use_layer_kernels`); until then, on another device, under ``KD_KERNELS=pure`` or
``KD_LAYER_KERNELS=off``, MLX's own ``scaled_dot_product_attention`` and ``silu`` run.

Where they run: the built-in transformer calls :func:`attention` and :func:`swiglu`, and
mlx-lm's llama, qwen2, qwen3, mistral and gemma3 layers do too once :func:`patch_mlx_lm`
has replaced the two names those modules import (``scaled_dot_product_attention`` and
``swiglu``), for the mlx-lm versions in :data:`CHECKED_MLX_LM` only; anything the kernels
do not cover (a quantized KV cache, attention sinks, a mask array, a float16 model) goes to
mlx-lm's own function.

:func:`attention` over more than one query runs the ``"attention"`` kernel where one is
registered: flash attention, one primitive forward and one backward that never hold the
``[B, heads, L, S]`` scores (under a gradient MLX keeps q, k, v, the output and one float
per query). A single query (a decoding step: no mask) and a registry without it take the
native softmax: ``q k^T`` and ``p v`` as matrix products (float32, a KV head's query heads
stacked as rows), which under a gradient hold the scores and probabilities, as MLX's own
attention does (a backward that recomputes them inside ``mx.custom_function`` keeps them
too: MLX keeps a traced graph's intermediates until the backward).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# mlx-lm versions whose layers were checked with the patch (tests/test_layer_kernels.py)
CHECKED_MLX_LM = ("0.32.2",)
MLX_LM_MODULES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")

_softmax: Callable[..., mx.array] | None = None
_swiglu: Callable[..., mx.array] | None = None
_flash: Callable[..., mx.array] | None = None
_patched: dict[str, tuple[Any, Any]] = {}  # module -> (its sdpa, its swiglu) before the patch


def use_layer_kernels(
    softmax: Callable[..., mx.array] | None,
    swiglu_kernel: Callable[..., mx.array] | None,
    flash: Callable[..., mx.array] | None = None,
) -> tuple[Any, Any, Any]:
    """Run ``softmax(x, scale, causal)``, ``swiglu(gate, up)`` and ``flash(q, k, v, scale,
    causal)`` (whole attention) from now on (None: MLX's own); returns the three it
    replaces."""
    global _softmax, _swiglu, _flash
    previous = (_softmax, _swiglu, _flash)
    _softmax, _swiglu, _flash = softmax, swiglu_kernel, flash
    return previous


def _native(x: mx.array) -> bool:
    # KD_KERNELS=pure is read at each call, as the row kernels read it; KD_LAYER_KERNELS=off
    # turns off the layer kernels alone (to measure what they give)
    return (
        mx.default_device().type == mx.cpu
        and x.dtype == mx.float32
        and os.environ.get("KD_KERNELS", "").strip().lower() != "pure"
        and os.environ.get("KD_LAYER_KERNELS", "").strip().lower() != "off"
    )


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None
) -> mx.array:
    """``softmax(scale q k^T + mask) v`` for ``q`` [B, Hq, L, D] and ``k``, ``v`` [B, Hkv, S,
    D] (``Hq`` a multiple of ``Hkv``); ``mask``: ``"causal"``, None or an additive array."""
    causal = isinstance(mask, str) and mask == "causal"
    if not (causal or mask is None) or not _native(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if _flash is not None and q.shape[2] > 1:
        f32 = mx.float32
        out = _flash(q.astype(f32), k.astype(f32), v.astype(f32), float(scale), causal)
        return out.astype(q.dtype)
    if _softmax is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return _attention_core(q, k, v, float(scale), causal, _softmax)


# Causal attention at least this long runs in query blocks of this many rows: block i reads
# keys [0, end of block i) only, so the score and value products and the held scores skip
# most of the upper triangle (5/8 of the full work with 4 blocks, 9/16 with 8).
CAUSAL_BLOCK_ROWS = 128


def _attention_core(q, k, v, scale: float, causal: bool, kernel) -> mx.array:
    L, S = q.shape[2], k.shape[2]
    q32, k32, v32 = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    if not causal or L < 2 * CAUSAL_BLOCK_ROWS:
        return _attend(q32, k32, v32, scale, causal, kernel).astype(q.dtype)
    # Queries are the last L of the S keys' positions (a KV cache's offset S - L).
    outs = []
    for start in range(0, L, CAUSAL_BLOCK_ROWS):
        stop = min(start + CAUSAL_BLOCK_ROWS, L)
        keys = S - L + stop  # the last key a query of this block may see, plus one
        outs.append(
            _attend(q32[:, :, start:stop], k32[:, :, :keys], v32[:, :, :keys], scale, True, kernel)
        )
    return mx.concatenate(outs, axis=2).astype(q.dtype)


def _attend(q, k, v, scale: float, causal: bool, kernel) -> mx.array:
    B, heads, L, D = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # A KV head's query heads stacked as rows, [B, Hkv, G * L, D]: one matrix product per
    # KV head, K and V read in place, no broadcast copy.
    qs = q.reshape(B, kv_heads, groups * L, D)
    scores = (qs @ k.swapaxes(-1, -2)).reshape(B, kv_heads, groups, L, -1)
    probs = kernel(scores, scale, causal).reshape(B, kv_heads, groups * L, -1)
    return (probs @ v).reshape(B, heads, L, D)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``."""
    kernel = _swiglu
    if kernel is None or not _native(gate) or up.dtype != mx.float32:
        return nn.silu(gate) * up
    return kernel(gate, up)


def _mlx_lm_attention(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        native = _softmax is not None or _flash is not None
        if not native or sinks is not None or hasattr(cache, "bits") or not _native(queries):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return attention(queries, keys, values, scale, mask)

    return scaled_dot_product_attention


def _mlx_lm_swiglu(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def swiglu_or_mlx_lm(gate, x):
        if _swiglu is None or not _native(gate) or x.dtype != mx.float32:
            return original(gate, x)
        return _swiglu(gate, x)

    return swiglu_or_mlx_lm


def patch_mlx_lm() -> list[str]:
    """Route mlx-lm's layers through :func:`attention` and :func:`swiglu` (the names the
    modules of :data:`MLX_LM_MODULES` import); the modules patched. Once per process, and
    only for an mlx-lm in :data:`CHECKED_MLX_LM`."""
    try:
        import importlib

        import mlx_lm
    except ImportError:
        return []
    if mlx_lm.__version__ not in CHECKED_MLX_LM:
        return []
    for name in MLX_LM_MODULES:
        if name in _patched:
            continue
        try:
            module = importlib.import_module(f"mlx_lm.models.{name}")
        except ImportError:
            continue
        sdpa = getattr(module, "scaled_dot_product_attention", None)
        act = getattr(module, "swiglu", None)
        _patched[name] = (sdpa, act)
        if sdpa is not None:
            module.scaled_dot_product_attention = _mlx_lm_attention(sdpa)
        if act is not None:
            module.swiglu = _mlx_lm_swiglu(act)
    return sorted(_patched)
