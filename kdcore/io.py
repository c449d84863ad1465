"""Files: atomic writes, safetensors and JSON. Nothing here pickles."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as _np_load_file

from kdcore.errors import CheckpointError


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; move it over ``path`` only on success.

    A crash while writing leaves the previous file untouched (``os.replace`` is atomic
    on POSIX within one directory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is for sharing
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, mx.array)):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON: {exc}") from exc


def save_arrays(path: str | os.PathLike, arrays: dict[str, mx.array], metadata=None) -> None:
    """Write ``arrays`` to a safetensors file atomically."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def load_arrays(path: str | os.PathLike, what: str = "tensor file") -> dict[str, mx.array]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return mx.load(str(path))
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError for bad files
        raise CheckpointError(f"{what} {path} is corrupt or not safetensors: {exc}") from exc


def load_numpy(path: str | os.PathLike, what: str = "tensor file") -> dict[str, np.ndarray]:
    """Load a safetensors file as NumPy arrays (memory-mapped by safetensors)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return _np_load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is corrupt or not safetensors: {exc}") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
