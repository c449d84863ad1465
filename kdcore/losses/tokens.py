"""The helpers every token loss shares.

Conventions (docs/spec.md): per-token divergences are summed over the vocabulary and
averaged over the tokens whose mask is 1; accumulation is float32; an all-masked batch
gives 0, not NaN."""

from __future__ import annotations

import mlx.core as mx

from kdcore.signal.teacher import stable_log_softmax

IGNORE_INDEX = -100


def masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    """Mean of ``values`` over positions where ``mask`` is 1; 0 when the mask is empty."""
    mask = mask.astype(mx.float32)
    total = (values.astype(mx.float32) * mask).sum()
    return total / mx.maximum(mask.sum(), 1.0)


def log_softmax(logits: mx.array, temperature: float | mx.array = 1.0) -> mx.array:
    """Float32 log-probabilities of ``logits / temperature`` over the last axis, exact to
    float32 rounding at any logit size (the row maximum is subtracted first)."""
    return stable_log_softmax(logits.astype(mx.float32) / temperature)


def token_cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-token cross-entropy [B, L]; 0 at ``IGNORE_INDEX``."""
    safe = mx.where(labels == IGNORE_INDEX, 0, labels)
    z = logits.astype(mx.float32)
    # logsumexp(z) - z_y computed as a difference of two numbers near max(z) loses ~1e-3 at
    # logits near 1e4; both sides are taken relative to the row maximum instead.
    z = z - mx.stop_gradient(z.max(-1, keepdims=True))
    logz = mx.logsumexp(z, axis=-1)
    picked = mx.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
    return mx.where(labels == IGNORE_INDEX, 0.0, logz - picked)
