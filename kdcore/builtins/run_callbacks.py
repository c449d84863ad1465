"""Built-in run callbacks: the ``tensorboard`` and ``jsonl`` metric sinks."""

from kdcore.engine.sinks import JsonlSink, JsonlSinkConfig, TensorBoardConfig, TensorBoardSink
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl


@hookimpl
def kd_run_callbacks():
    return [
        Component(
            "tensorboard",
            TensorBoardSink,
            TensorBoardConfig,
            doc="TensorBoard event files of every logged scalar (extra: kdcore[tensorboard])",
        ),
        Component(
            "jsonl",
            JsonlSink,
            JsonlSinkConfig,
            doc="append every logged scalar, tagged with the run name, to a JSONL file",
        ),
    ]
