"""The offline teacher cache: the ``cache`` teacher source and the ``kd cache`` command."""

from kdcore.cache import CacheSourceConfig, CacheTeacher, add_parser
from kdcore.components import Component
from kdcore.plugins import hookimpl


@hookimpl
def kd_teacher_sources():
    return [
        Component(
            "cache",
            CacheTeacher,
            CacheSourceConfig,
            doc="an offline top-k teacher cache (cache = DIR); never loads the teacher model",
        )
    ]


@hookimpl
def kd_add_commands(subparsers):
    add_parser(subparsers)
