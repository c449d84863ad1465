"""``kd distill``: build the parts, open the run folder, train, write the summary."""

from __future__ import annotations

from pathlib import Path

from kdcore.engine.build import Parts, build_parts
from kdcore.engine.heap import reuse_freed_memory
from kdcore.engine.loop import Resume, RunInfo, train
from kdcore.engine.rundir import RunDir, output_dir
from kdcore.spec.load import load_spec
from kdcore.spec.schema import RunSpec


def distill(
    spec: RunSpec | dict | str | Path,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict:
    """Run a distillation from a spec (a path, a dict or a RunSpec); returns the summary."""
    if not isinstance(spec, RunSpec):
        spec = load_spec(spec, overrides or [])
    return train_parts(build_parts(spec), output, resume=resume, progress=progress)


def train_parts(
    parts: Parts, output: str | Path | None, resume: bool = False, progress: bool | None = None
) -> dict:
    """Train built parts into a run folder (``output``, else the spec's); the summary."""
    reuse_freed_memory()  # big buffers without a page fault per 4 KiB (kdcore.engine.heap)
    run_dir = RunDir(parts, output_dir(parts.spec, output), resume)
    start = Resume(**run_dir.restored) if run_dir.restored else None
    try:
        return train(
            parts,
            info=RunInfo(output=run_dir.out, spec=parts.spec, total_steps=parts.total),
            callbacks=[run_dir, *parts.callbacks],
            save_checkpoint=run_dir.save_checkpoint,
            resume=start,
            progress=progress,
        )
    finally:
        run_dir.close()
        run_dir.release()  # the folder's lock, held from RunDir's checks to the summary
