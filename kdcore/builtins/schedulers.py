"""Built-in schedulers: constant, linear, cosine, exponential, step (each with warm-up)."""

from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl
from kdcore.spec.schedulers import (
    ConstantConfig,
    ExponentialConfig,
    RangeConfig,
    StepConfig,
    constant,
    cosine,
    exponential,
    linear,
    step_decay,
)


@hookimpl
def kd_schedulers():
    return [
        Component("constant", constant, ConstantConfig, doc="a fixed value (after warmup)"),
        Component("linear", linear, RangeConfig, doc="straight line from start to end"),
        Component("cosine", cosine, RangeConfig, doc="half cosine from start to end"),
        Component("exponential", exponential, ExponentialConfig, doc="geometric from start to end"),
        Component("step", step_decay, StepConfig, doc="start * gamma^(drops so far)"),
    ]
