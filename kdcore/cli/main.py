"""The ``kd`` command line: a parser filled by ``kd_add_commands``, errors as messages."""

from __future__ import annotations

import argparse
import sys

from kdcore.errors import KdError, SpecError
from kdcore.registry.manager import get_registry


def build_parser() -> argparse.ArgumentParser:
    """``kd`` and every command: the built-ins and each plugin's, all through
    ``kd_add_commands``."""
    parser = argparse.ArgumentParser(prog="kd", description="knowledge distillation on MLX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    get_registry().pm.hook.kd_add_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        from kdcore.cli.fastpath import reexec_with_fast_path

        reexec_with_fast_path()
    try:
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
