"""Built-in teacher sources: a saved model folder, an mlx-lm folder, an offline cache, a
teacher server."""

from kdcore.cache.read import CacheSourceConfig, CacheTeacher
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl
from kdcore.teachers.mlxlm import MlxLmTeacher, MlxLmTeacherConfig
from kdcore.teachers.model import ModelSourceConfig, ModelTeacher
from kdcore.teachers.served import ServedTeacher, ServedTeacherConfig


@hookimpl
def kd_teacher_sources():
    return [
        Component("model", ModelTeacher, ModelSourceConfig, doc="a saved model directory (path)"),
        Component(
            "mlx-lm",
            MlxLmTeacher,
            MlxLmTeacherConfig,
            doc="a local mlx-lm model directory (path); retokenizes when its tokenizer differs",
        ),
        Component(
            "cache",
            CacheTeacher,
            CacheSourceConfig,
            doc="an offline top-k teacher cache (cache = DIR); never loads the teacher model",
        ),
        Component(
            "server",
            ServedTeacher,
            ServedTeacherConfig,
            doc="a teacher behind kd serve or an OpenAI-style server (server = URL); top-k",
        ),
    ]
