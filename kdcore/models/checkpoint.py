"""Gradient checkpointing per layer: a layer's activations recomputed in the backward."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


def checkpointed(layer: nn.Module, fn: Callable[..., mx.array], *arrays: mx.array) -> mx.array:
    """``fn(*arrays)``, a call of ``layer``, under ``mx.checkpoint``: the backward keeps only
    the layer's inputs and recomputes the rest (one more forward of the layer; memory of
    one layer's activations instead of all). ``layer``'s trainable parameters are passed
    through the checkpoint so their gradients flow; frozen ones are constants."""

    def inner(params, *xs):
        layer.update(params)
        return fn(*xs)

    return mx.checkpoint(inner)(layer.trainable_parameters(), *arrays)
