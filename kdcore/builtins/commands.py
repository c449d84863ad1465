"""Built-in ``kd`` commands, registered through ``kd_add_commands`` like any plugin's."""

from kdcore.cli import analysis, cache, commands, gguf, sample, serve
from kdcore.registry.manager import hookimpl


@hookimpl
def kd_add_commands(subparsers):
    commands.add_commands(subparsers)
    cache.add_parser(subparsers)
    analysis.add_commands(subparsers)
    sample.add_parser(subparsers)
    gguf.add_parser(subparsers)
    gguf.add_export_parser(subparsers)
    serve.add_parser(subparsers)
