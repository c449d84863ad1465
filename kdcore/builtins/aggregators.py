"""Built-in teacher aggregators: ``mean``, ``weighted`` (fixed or learnable) and ``route``
(one teacher per record), and ``kd report``'s section on a routed run's teachers."""

from kdcore.analysis.routing import routing_section
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl
from kdcore.signal.mixture import MeanConfig, Weighted, WeightedConfig, mean
from kdcore.signal.route import Route, RouteConfig


@hookimpl
def kd_teacher_aggregators():
    return [
        Component("mean", mean, MeanConfig, doc="average of the teachers' probabilities"),
        Component("weighted", Weighted, WeightedConfig, doc="weighted average, fixed or learnable"),
        Component(
            "route",
            Route,
            RouteConfig,
            doc="each record's tokens to one teacher, by a record field, the data source or a "
            "rule (docs/multi_teacher.md)",
        ),
    ]


@hookimpl
def kd_report_sections(run_dir, figures_dir):
    return routing_section(run_dir, figures_dir)
