"""The core's own components, registered through the same hooks as any plugin: one module
per kind, each only registration (the implementations live in the pipeline's packages)."""

from kdcore.builtins import (
    aggregators,
    aligners,
    commands,
    datasets,
    initializers,
    losses,
    models,
    run_callbacks,
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
    run_callbacks,
    commands,
]
