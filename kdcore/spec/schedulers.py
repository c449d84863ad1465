"""The built-in schedulers' maths: constant, linear, cosine, exponential and step decay,
each with an optional linear warm-up."""

from __future__ import annotations

import math

import attrs

from kdcore.spec.validators import non_negative


@attrs.define(kw_only=True)
class _Common:
    warmup: int = attrs.field(default=0, validator=non_negative)
    warmup_start: float = 0.0
    steps: int | None = attrs.field(default=None, validator=non_negative)  # default: the run's


@attrs.define(kw_only=True)
class ConstantConfig(_Common):
    value: float = 1.0


@attrs.define(kw_only=True)
class RangeConfig(_Common):
    start: float = 1.0
    end: float = 0.0


@attrs.define(kw_only=True)
class ExponentialConfig(_Common):
    start: float = 1.0
    end: float = 0.01

    def __attrs_post_init__(self):
        if self.start <= 0 or self.end <= 0:
            raise ValueError("exponential schedule needs start > 0 and end > 0")


@attrs.define(kw_only=True)
class StepConfig(_Common):
    start: float = 1.0
    gamma: float = 0.1
    every: int | None = None  # multiply by gamma every N steps ...
    milestones: list[int] = attrs.field(factory=list)  # ... or at these steps


def _with_warmup(config: _Common, shape):
    """Wrap ``shape(progress in [0, 1]) -> value`` with warmup and step bookkeeping."""

    def value(step: int, total: int) -> float:
        if step < config.warmup:
            start = shape(0.0)
            return config.warmup_start + (start - config.warmup_start) * step / config.warmup
        span = max(1, total - config.warmup)
        return shape(min(1.0, (step - config.warmup) / span))

    return value


def constant(config: ConstantConfig, setup=None):
    return _with_warmup(config, lambda p: config.value)


def linear(config: RangeConfig, setup=None):
    return _with_warmup(config, lambda p: config.start + (config.end - config.start) * p)


def cosine(config: RangeConfig, setup=None):
    def shape(p):
        return config.end + (config.start - config.end) * 0.5 * (1 + math.cos(math.pi * p))

    return _with_warmup(config, shape)


def exponential(config: ExponentialConfig, setup=None):
    return _with_warmup(config, lambda p: config.start * (config.end / config.start) ** p)


def step_decay(config: StepConfig, setup=None):
    def value(step: int, total: int) -> float:
        if step < config.warmup:
            return config.warmup_start + (config.start - config.warmup_start) * step / config.warmup
        after = step - config.warmup
        if config.every:
            drops = after // config.every
        else:
            drops = sum(1 for m in config.milestones if step >= m)
        return config.start * config.gamma**drops

    return value
