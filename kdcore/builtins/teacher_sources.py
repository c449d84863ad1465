"""Built-in teacher sources."""

from kdcore.components import Component
from kdcore.plugins import hookimpl
from kdcore.teachers import ModelSourceConfig, ModelTeacher


@hookimpl
def kd_teacher_sources():
    return [
        Component("model", ModelTeacher, ModelSourceConfig, doc="a saved model directory (path)")
    ]
