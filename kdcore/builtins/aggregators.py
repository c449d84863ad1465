"""Built-in teacher aggregators: ``mean`` and ``weighted`` (fixed or learnable)."""

from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl
from kdcore.signal.mixture import MeanConfig, Weighted, WeightedConfig, mean


@hookimpl
def kd_teacher_aggregators():
    return [
        Component("mean", mean, MeanConfig, doc="average of the teachers' probabilities"),
        Component("weighted", Weighted, WeightedConfig, doc="weighted average, fixed or learnable"),
    ]
