"""Training checkpoints, written so that a crash never destroys the previous one.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` with ``trainable.safetensors``
(student and learnable component parameters), ``optimizer.safetensors``, ``extra.safetensors``
(component state such as an EMA teacher) and ``state.json`` (step, data
position, stage, a hash of the spec, the sha256 of each file). The folder is written under a
temporary name and renamed into place, then ``checkpoints/latest`` is replaced atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from kdcore.errors import CheckpointError
from kdcore.io import atomic_path, load_arrays, read_json, save_arrays, sha256_file, write_json

FILES = ("trainable.safetensors", "optimizer.safetensors", "extra.safetensors")


def _flat(tree: Any) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(tree) if isinstance(v, mx.array)}


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    trainable: Any,
    optimizer_state: Any,
    extra: dict[str, mx.array],
    state: dict,
    keep: int = 2,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        save_arrays(tmp / FILES[0], _flat(trainable))
        save_arrays(tmp / FILES[1], _flat(optimizer_state))
        save_arrays(tmp / FILES[2], extra)
        hashes = {name: sha256_file(tmp / name) for name in FILES}
        write_json(tmp / "state.json", {**state, "step": step, "sha256": hashes})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    with atomic_path(root / "latest") as pointer:
        pointer.write_text(final.name + "\n")
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict, dict]:
    """(state, trainable, optimizer, extra) from a checkpoint folder, checksums verified."""
    path = Path(path)
    state = read_json(path / "state.json", "checkpoint state")
    for name in FILES:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        expected = state.get("sha256", {}).get(name)
        if expected and sha256_file(file) != expected:
            raise CheckpointError(f"checkpoint file {file} is corrupt (sha256 mismatch)")
    trainable = load_arrays(path / FILES[0], "checkpoint weights")
    optimizer = load_arrays(path / FILES[1], "checkpoint optimizer state")
    extra = load_arrays(path / FILES[2], "checkpoint extra state")
    return state, trainable, optimizer, extra


def unflatten(flat: dict[str, mx.array]) -> Any:
    return tree_unflatten(list(flat.items()))
