"""Scheduled values: any float in a spec may be ``{schedule = "cosine", start = 4.0, end = 1.0}``.

A :class:`Schedule` holds the scheduler component and its structured config; ``value_at``
turns floats and schedules alike into the number for a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen(eq=False)
class Schedule:
    """A float that changes with the training step."""

    name: str
    config: Any
    fn: Callable[[int, int], float]

    def __call__(self, step: int, total: int) -> float:
        steps = getattr(self.config, "steps", None) or total
        return float(self.fn(step, max(1, steps)))

    def to_dict(self) -> dict:
        return {"schedule": self.name, **attrs.asdict(self.config)}


def value_at(value: float | Schedule, step: int, total: int) -> float:
    """The number ``value`` stands for at ``step`` of ``total``."""
    if isinstance(value, Schedule):
        return value(step, total)
    return float(value)


def scheduled_fields(config: Any) -> dict[str, Schedule]:
    """The fields of an attrs config whose value is a schedule."""
    if config is None or not attrs.has(type(config)):
        return {}
    return {
        f.name: getattr(config, f.name)
        for f in attrs.fields(type(config))
        if isinstance(getattr(config, f.name), Schedule)
    }
