"""What a loss receives, and the helpers every token loss shares.

Conventions (docs/spec.md): per-token divergences are summed over the vocabulary and
averaged over the tokens whose mask is 1; accumulation is float32; an all-masked batch
gives 0, not NaN.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx

from kdcore.models.output import ModelOutput
from kdcore.signal import TeacherSignal

IGNORE_INDEX = -100


@attrs.frozen(eq=False)
class LossInputs:
    """Everything a loss may look at in one step.

    ``batch`` holds at least ``input_ids`` [B, L], ``labels`` [B, L] (next-token targets,
    ``IGNORE_INDEX`` where no loss) and ``mask`` [B, L] (1.0 where ``labels`` is a real
    token). ``params`` is the component's config at this step.
    """

    student: ModelOutput
    teacher: TeacherSignal | None
    batch: dict[str, mx.array]
    params: Any = None
    step: int = 0
    total_steps: int = 1
    extras: dict[str, Any] = attrs.field(factory=dict)  # e.g. aggregator weights, samples


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


@attrs.define
class CrossEntropyConfig:
    label_smoothing: float = 0.0


def cross_entropy(config: CrossEntropyConfig, setup: Any = None):
    """Hard-label cross-entropy, masked mean over tokens."""

    def loss(inputs: LossInputs):
        logits = inputs.student.logits
        labels = inputs.batch["labels"]
        mask = inputs.batch["mask"]
        nll = token_cross_entropy(logits, labels)
        smoothing = inputs.params.label_smoothing if inputs.params is not None else 0.0
        if isinstance(smoothing, mx.array) or smoothing:
            uniform = -log_softmax(logits).mean(axis=-1)
            nll = (1 - smoothing) * nll + smoothing * uniform
        return masked_mean(nll, mask), {}

    return loss
