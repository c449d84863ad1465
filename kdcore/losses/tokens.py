"""The helpers every token loss shares.

Conventions (docs/spec.md): per-token divergences are summed over the vocabulary and
averaged over the tokens whose mask is 1; accumulation is float32; an all-masked batch
gives 0, not NaN."""

from __future__ import annotations

import mlx.core as mx

IGNORE_INDEX = -100


def masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    """Mean of ``values`` over positions where ``mask`` is 1; 0 when the mask is empty."""
    mask = mask.astype(mx.float32)
    total = (values.astype(mx.float32) * mask).sum()
    return total / mx.maximum(mask.sum(), 1.0)


def log_softmax(logits: mx.array, temperature: float | mx.array = 1.0) -> mx.array:
    z = logits.astype(mx.float32) / temperature
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def token_cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-token cross-entropy [B, L]; 0 at ``IGNORE_INDEX``."""
    safe = mx.where(labels == IGNORE_INDEX, 0, labels)
    logz = mx.logsumexp(logits.astype(mx.float32), axis=-1)
    picked = mx.take_along_axis(logits.astype(mx.float32), safe[..., None], axis=-1)[..., 0]
    return mx.where(labels == IGNORE_INDEX, 0.0, logz - picked)
