"""The attrs validators that configs share: ranges for numbers that may be schedules.

Use them as ``attrs.field(validator=...)``; a list chains them (attrs runs each in turn)::

    from kdcore import validators

    @attrs.define
    class Config:
        temperature: float = attrs.field(default=2.0, validator=validators.positive)
        top_k: int = attrs.field(default=0, validator=validators.non_negative)
        val_fraction: float = attrs.field(
            default=0.1, validator=[validators.number, validators.fraction]
        )

Every error begins with the field's name ("temperature must be > 0, got -1.0"), which
``kdcore.spec.convert.structure_errors`` turns into the field's path ($.losses[0].params.
temperature). ``None`` passes (for ``int | None`` fields), and so does a
:class:`kdcore.app.Schedule`: any float of a spec may be one, and a schedule's values are
checked where they are used. A field read once, when the component is built, adds
:func:`number` to refuse a schedule. Non-finite floats never get here: the converter
refuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from kdcore.spec.schedules import Schedule

Validator = Callable[[Any, attrs.Attribute, Any], None]


def _skip(value: Any) -> bool:
    """Whether a range check does not apply: no value, or one that changes with the step."""
    return value is None or isinstance(value, Schedule)


def positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """``value > 0`` (None and schedules pass)."""
    if not _skip(value) and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def non_negative(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """``value >= 0`` (None and schedules pass)."""
    if not _skip(value) and not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def number(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Not a schedule: for a value read once, when its component is built (a model's size,
    a dataset's split), which a schedule could not change."""
    if isinstance(value, Schedule):
        raise ValueError(f"{attribute.name} must be a number, not a schedule")


def at_least(low: float) -> Validator:
    """A validator of ``value >= low`` (None and schedules pass), e.g. ``at_least(1)``."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not _skip(value) and not value >= low:
            raise ValueError(f"{attribute.name} must be >= {low:g}, got {value}")

    return check


def in_range(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Validator:
    """A validator of ``low <= value <= high`` (None and schedules pass); ``low_open`` and
    ``high_open`` leave an end out. The error writes the interval: ``must be in (0, 1]``."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if _skip(value):
            return
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise ValueError(f"{attribute.name} must be in {interval}, got {value}")

    return check


unit_interval: Validator = in_range(0.0, 1.0)
"""``0 <= value <= 1``: a weight or a mixing coefficient (None and schedules pass)."""

fraction: Validator = in_range(0.0, 1.0, high_open=True)
"""``0 <= value < 1``: a share that leaves something over, such as a val split."""
