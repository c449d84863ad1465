"""Mixtures of teachers: ``sum_k w_k softmax(z_k / T)`` as one signal, and the ``mean``
and ``weighted`` aggregators that make them."""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore.signal.teacher import TeacherSignal


def mixture(signals: list[TeacherSignal], weights: mx.array) -> TeacherSignal:
    """The mixture ``sum_k w_k softmax(z_k / T)``; one teacher passes through unchanged."""
    if len(signals) == 1:
        return signals[0]
    return TeacherSignal(vocab_size=signals[0].vocab_size, members=tuple(signals), weights=weights)


@attrs.define
class MeanConfig:
    pass


def mean(config: MeanConfig, setup=None):
    """Average of the teachers' probabilities (not of their logits)."""

    def aggregate(signals, inputs=None):
        batch = signals[0].shape[0]
        weights = mx.full((batch, len(signals)), 1.0 / len(signals))
        return mixture(signals, weights)

    return aggregate


@attrs.define
class WeightedConfig:
    weights: list[float] | None = None  # default: equal
    learnable: bool = False


class Weighted(nn.Module):
    """Fixed weights, or learnable ones (softmax of free logits) trained with the student."""

    def __init__(self, config: WeightedConfig, setup=None):
        super().__init__()
        count = len(config.weights) if config.weights else (setup.num_teachers if setup else 1)
        raw = mx.array(config.weights if config.weights else [1.0] * count, dtype=mx.float32)
        if (raw < 0).any().item() or raw.sum().item() <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        if config.learnable:
            self.logits = mx.log(raw / raw.sum())
        else:
            self._fixed = raw / raw.sum()
        self.learnable = config.learnable
        if not config.learnable:
            self.freeze()

    def current(self) -> mx.array:
        return mx.softmax(self.logits) if self.learnable else self._fixed

    def __call__(self, signals, inputs=None):
        w = self.current()
        if w.shape[0] != len(signals):
            raise ValueError(f"{w.shape[0]} weights for {len(signals)} teachers")
        batch = signals[0].shape[0]
        return mixture(signals, mx.broadcast_to(w[None, :], (batch, w.shape[0])))
