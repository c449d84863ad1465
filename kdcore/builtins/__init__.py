"""The core's own components, registered through the same hooks as any plugin."""

from kdcore.builtins import (
    aggregators,
    aligners,
    analysis,
    cache,
    datasets,
    initializers,
    losses,
    models,
    realscale,
    schedulers,
    teacher_sources,
)

MODULES = [
    losses,
    schedulers,
    aggregators,
    aligners,
    initializers,
    models,
    datasets,
    teacher_sources,
    cache,
    analysis,
    realscale,
]
