"""The built-in ``ce`` loss: hard-label cross-entropy, optionally label-smoothed."""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx

from kdcore.losses.inputs import LossInputs
from kdcore.losses.rows import RowLoss, cross_entropy_rows
from kdcore.losses.tokens import log_softmax, masked_mean, token_cross_entropy


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

    def rows(inputs: LossInputs):
        smoothing = inputs.params.label_smoothing if inputs.params is not None else 0.0
        return cross_entropy_rows(smoothing)

    return RowLoss(rows, loss)
