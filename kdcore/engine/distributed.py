"""Data-parallel training through ``mx.distributed`` (ring, MPI, NCCL: whatever
``mlx.launch`` set up; one process is a group of size 1 and every helper is a no-op).

``mlx.launch -n 2 --backend ring -- kd distill SPEC`` starts two processes. Each builds
the same run (same seed, same initial weights), reads the same global batch of
``train.batch_size`` rows and keeps its share (rows ``rank::size`` would reorder rows;
contiguous blocks ``[rank * B/n, (rank + 1) * B/n)`` are used). After the backward pass the
gradients are averaged with ``all_sum / size``, so every process applies the same update
and the parameters stay identical. That is the single-process step exactly when each share
holds the same number of loss tokens (text windows), the same condition under which
gradient accumulation equals a large batch. Only rank 0 writes the output directory; the
others write their (small) logs to a scratch directory that is removed at exit.

``kd cache`` splits its shards over the ranks: :func:`my_items` gives each rank its shard
indices and :func:`barrier` waits for all before rank 0 writes the manifest.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from kdcore.errors import CheckpointError, SpecError


class DataParallel:
    """This process's place in the group, and the collective operations the engine uses."""

    def __init__(self, group: Any | None = None):
        self.group = group if group is not None else init()
        self.rank = self.group.rank() if self.group is not None else 0
        self.size = self.group.size() if self.group is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This rank's rows of a global batch (every array's first axis is split)."""
        if self.size == 1:
            return batch
        rows = len(next(iter(batch.values())))
        if rows % self.size:
            raise SpecError(
                f"train.batch_size {rows} is not divisible by the {self.size} processes "
                "@ $.train.batch_size"
            )
        per = rows // self.size
        lo, hi = self.rank * per, (self.rank + 1) * per
        return {k: v[lo:hi] for k, v in batch.items()}

    def all_sum(self, tree: Any) -> Any:
        if self.size == 1:
            return tree
        return tree_map(
            lambda x: mx.distributed.all_sum(x, group=self.group) if isinstance(x, mx.array) else x,
            tree,
        )

    def average(self, tree: Any) -> Any:
        """Mean over the processes of every array in ``tree``."""
        if self.size == 1:
            return tree
        scale = 1.0 / self.size
        return tree_map(
            lambda x: (
                mx.distributed.all_sum(x, group=self.group) * scale
                if isinstance(x, mx.array)
                else x
            ),
            tree,
        )

    def reduce_step(self, total, terms: dict, metrics: dict, grads: Any, ntok: Any):
        """The engine's step results averaged over the processes (token counts summed:
        ``ntok`` an int or a tuple of them, such as the engine's ``TokenCounts``)."""
        if self.size == 1:
            return total, terms, metrics, grads, ntok
        total, terms, metrics, grads = self.average((total, terms, metrics, grads))
        if isinstance(ntok, tuple):
            summed = self.all_sum(mx.array(list(ntok), dtype=mx.float32)).tolist()
            ntok = type(ntok)(*(int(n) for n in summed))
        else:
            ntok = int(self.all_sum(mx.array(ntok, dtype=mx.float32)).item())
        return total, terms, metrics, grads, ntok

    def output_dir(self, out: Path, resume: bool = False) -> Path:
        """Where this process writes: ``out`` on rank 0, a scratch directory elsewhere.

        A resumed run copies the newest checkpoint of ``out`` into the scratch directory so
        every rank restores the same state; a fresh run into an existing run directory
        fails on every rank (rank 0 alone failing would leave the others waiting).
        """
        if self.is_main:
            return out
        if not resume and (out / "checkpoints" / "latest").exists():
            raise CheckpointError(
                f"{out} already holds a run; pass --resume to continue it or choose "
                "another --output"
            )
        scratch = Path(tempfile.mkdtemp(prefix=f"kd-rank{self.rank}-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        if resume and (out / "checkpoints").is_dir():
            shutil.copytree(out / "checkpoints", scratch / "checkpoints", symlinks=True)
        return scratch

    def seed(self, seed: int) -> int:
        """A per-process seed: rank 0 keeps ``seed`` (a single process is unchanged), the
        others draw other random numbers (dropout, sampling) for their own rows."""
        return seed + 7_919 * self.rank

    def log_stream(self) -> Any:
        """Where progress lines go: the terminal on rank 0, nowhere on the others."""
        return None if self.is_main else io.StringIO()

    def barrier(self) -> None:
        barrier(self.group)


def init(backend: str = "any") -> Any:
    """The process group ``mlx.launch`` set up, or a group of size 1."""
    if not mx.distributed.is_available():
        return None
    return mx.distributed.init(strict=False, backend=backend)


def barrier(group: Any | None = None) -> None:
    """Return once every process got here (an ``all_sum`` of one number)."""
    group = group if group is not None else init()
    if group is None or group.size() == 1:
        return
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def my_items(count: int, group: Any | None = None) -> list[int]:
    """Indices ``0..count-1`` this rank handles: ``rank, rank + size, ...``."""
    group = group if group is not None else init()
    if group is None:
        return list(range(count))
    return list(range(group.rank(), count, group.size()))
