"""The ``kd`` command line: a parser filled by ``kd_add_commands``, errors as messages."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from kdcore.errors import KdError, RegistryError, SpecError
from kdcore.registry.manager import get_registry


def build_parser() -> argparse.ArgumentParser:
    """``kd`` and every command: the built-ins and each plugin's, all through
    ``kd_add_commands``."""
    parser = argparse.ArgumentParser(prog="kd", description="knowledge distillation on MLX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry = get_registry()
    strict = os.environ.get("KD_STRICT_PLUGINS") == "1"
    # One plugin at a time: a plugin whose hook raises loses its own commands only.
    for plugin, outcome in registry.each("kd_add_commands", subparsers=sub):
        if isinstance(outcome, Exception):
            name, dist = registry.pm.get_name(plugin), registry.distribution_of(plugin)
            message = f"plugin {name!r} from {dist}: kd_add_commands raised {outcome!r}"
            if strict:
                raise RegistryError(message) from outcome
            print(f"warning: {message}; its commands are missing", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        from kdcore.cli.fastpath import reexec_with_fast_path

        reexec_with_fast_path()
    try:
        from kdcore.engine.heap import reuse_freed_memory

        reuse_freed_memory()
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SpecError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file the command reads or writes: the OS's words, no trace
        hint = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "; free space and run the command again (kd distill: with --resume)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
