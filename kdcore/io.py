"""Files: atomic writes, safetensors and JSON. Nothing here pickles."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as _np_load_file

from kdcore.errors import CheckpointError


def kd_cache_root() -> Path:
    """kdcore's own cache (``$KD_CACHE``, default ``~/.cache/kdcore``): imported GGUF
    models, hub datasets written as files."""
    return Path(os.environ.get("KD_CACHE") or Path.home() / ".cache" / "kdcore")


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
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"no space left on the device writing {path} ({exc.strerror}); {path.name} "
                "is unchanged: free space, then run the command again"
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# What ``atomic_path`` names its temporaries: ".NAME." + 8 characters of mkstemp + ".tmp"
# and the suffix. A kill between mkstemp and os.replace leaves one behind.
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.\w+)?$")


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what a killed ``atomic_path`` left directly in ``folder``; the paths removed.

    Only for a folder whose writer is known to be stopped (a run folder under its lock):
    a live writer's temporary looks the same."""
    folder = Path(folder)
    removed = []
    for path in folder.iterdir() if folder.is_dir() else []:
        if TEMPORARY.match(path.name) and not path.is_symlink():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read: {exc}") from exc
    # ValueError: JSON errors and integers past Python's digit limit; RecursionError: nesting
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON: {exc}") from None


def save_arrays(path: str | os.PathLike, arrays: dict[str, mx.array], metadata=None) -> None:
    """Write ``arrays`` to a safetensors file atomically."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        except RuntimeError as exc:  # MLX's own writer: "[write] Unable to write N bytes"
            raise CheckpointError(
                f"cannot write {path}: {exc} (is the disk full?); {Path(path).name} is "
                "unchanged: free space, then run the command again"
            ) from None


# Bytes per element of each safetensors dtype (the format's own list).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "C64": 8,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own bound


def check_safetensors(path: str | os.PathLike, what: str = "tensor file") -> dict[str, Any]:
    """The header of a safetensors file, refused unless every tensor in it is well formed:
    a known dtype, a shape of non-negative integers, data offsets inside the file that hold
    exactly that shape. ``mx.load`` trusts the header: it accepts a negative shape (-2 x -3
    has 6 elements) and leaves the checking to whatever later uses the array."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{what} {path} is not safetensors: {size} bytes, no header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            state = "truncated" if length <= MAX_HEADER_BYTES else "corrupt"
            raise CheckpointError(
                f"{what} {path} is {state}: its header claims {length} bytes of a {size}-byte file"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{what} {path} is corrupt: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} {path} is corrupt: its header is not a JSON object")
    data_bytes = size - 8 - length

    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{what} {path} is corrupt: {message}")

    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (
                isinstance(info, dict) and all(isinstance(v, str) for v in info.values())
            ):
                raise bad("__metadata__ is not a table of strings")
            continue
        if not isinstance(info, dict):
            raise bad(f"tensor {name!r} is not described by a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(n) for n in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of integers")
        if any(n < 0 for n in shape):
            raise bad(f"tensor {name!r} has a negative dimension in shape {shape}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(n) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has data offsets {offsets!r}")
        if offsets[1] > data_bytes:  # a file cut short, or a header that lies
            raise CheckpointError(
                f"{what} {path} is truncated: tensor {name!r} has data offsets {offsets} "
                f"past the file's {data_bytes} data bytes"
            )
        needed = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != needed:
            raise bad(
                f"tensor {name!r} of shape {shape} ({dtype}) needs {needed} bytes, its "
                f"offsets span {offsets[1] - offsets[0]} bytes"
            )
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_arrays(path: str | os.PathLike, what: str = "tensor file") -> dict[str, mx.array]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a safetensors file")
    if path.suffix == ".safetensors":
        check_safetensors(path, what)
    try:
        return mx.load(str(path))
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError for bad files
        raise CheckpointError(f"{what} {path} is corrupt or not safetensors: {exc}") from exc


def load_numpy(path: str | os.PathLike, what: str = "tensor file") -> dict[str, np.ndarray]:
    """Load a safetensors file as NumPy arrays (memory-mapped by safetensors)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a safetensors file")
    check_safetensors(path, what)
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


def temporaries_of(path: str | os.PathLike) -> list[Path]:
    """What a killed ``atomic_path(path)`` left beside ``path`` (``.NAME.`` + 8 characters of
    mkstemp + ``.tmp`` and a suffix), not another file's. Only for a writer that knows no
    other one writes ``path`` now (it holds a lock): a live writer's temporary looks the
    same."""
    path = Path(path)
    own = re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]{8}\.tmp(\.\w+)?")
    if not path.parent.is_dir():
        return []
    return sorted(
        p
        for p in path.parent.iterdir()
        if own.fullmatch(p.name) and p.is_file() and not p.is_symlink()
    )
