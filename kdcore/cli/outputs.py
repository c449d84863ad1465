"""Files a user names for a command to write: never one of the command's own inputs, and an
existing one only with ``--force``."""

from __future__ import annotations

import os
from pathlib import Path

from kdcore.errors import CheckpointError


def check_output(
    output: Path,
    inputs: list[tuple[Path, str]],
    force: bool,
    command: str,
    also: tuple[Path, ...] = (),
) -> None:
    """Refuse a file the user named for ``command`` to write when it is one of ``inputs``
    (``(path, what it is)``; always, whatever ``force``: paths compared resolved, links
    followed; a file already inside an input folder counts), a folder, or an existing file
    without ``force``. ``also``: files the command writes beside it (checked as inputs)."""
    for target in (output, *also):
        resolved = target.resolve()
        for path, what in inputs:
            source = path.resolve()
            if source.is_dir():
                # a new file in an input folder changes no input; one there already may be
                hit = resolved == source or (
                    target is output and resolved.exists() and resolved.is_relative_to(source)
                )
            else:
                hit = resolved == source or (
                    resolved.exists() and source.exists() and os.path.samefile(resolved, source)
                )
            if hit:
                raise CheckpointError(
                    f"{output} would write over {path} ({what}), an input of this "
                    f"{command}: choose another file"
                )
    if output.is_dir():
        raise CheckpointError(f"{output} is a folder: name the file to write")
    if output.exists() and not force:
        raise CheckpointError(f"{output} exists: pass --force to replace it")
