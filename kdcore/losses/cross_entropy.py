"""The built-in ``ce`` loss: hard-label cross-entropy, optionally label-smoothed."""

from __future__ import annotations

from typing import Any

import attrs

from kdcore.losses.inputs import LossInputs
from kdcore.losses.rows import RowLoss, cross_entropy_rows


@attrs.define
class CrossEntropyConfig:
    label_smoothing: float = 0.0


def cross_entropy(config: CrossEntropyConfig, setup: Any = None):
    """Hard-label cross-entropy, masked mean over tokens."""

    def rows(inputs: LossInputs):
        return cross_entropy_rows(inputs.params.label_smoothing)

    return RowLoss(rows)
