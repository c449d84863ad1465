"""Training checkpoints, written so that a crash never destroys the previous one.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` with ``trainable.safetensors``
(student and learnable component parameters), ``optimizer.safetensors``, ``extra.safetensors``
(component state such as an EMA teacher) and ``state.json`` (step, data
position, stage, a hash of the spec, the sha256 of each file and, beside them, the sha256 of
the state itself). The folder is written under a temporary name and renamed into place, then
``checkpoints/latest`` is replaced atomically.

Nothing read back is trusted: ``latest`` must name a ``step-N`` folder inside ``checkpoints``,
``state.json`` is checked field by field and against its own hash, each tensor file against
its hash and its header (:func:`kdcore.io.check_safetensors`). A checkpoint holding NaN or
inf is never written, so every checkpoint on disk can be resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from kdcore.errors import CheckpointError, NonFiniteStateError
from kdcore.io import (
    atomic_path,
    load_arrays,
    read_json,
    remove_temporaries,
    save_arrays,
    sha256_file,
    write_json,
)

FILES = ("trainable.safetensors", "optimizer.safetensors", "extra.safetensors")
NAME = re.compile(r"^step-(\d+)$")
# what ``tempfile.mkdtemp(prefix=".step-N.")`` names a checkpoint being written
TEMPORARY = re.compile(r"^\.step-\d+\..+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Fields a state.json may hold besides step and the hashes, and their types.
_OPTIONAL = {
    "stage": int,
    "data_position": int,
    "spec_hash": str,
    "student_arch": str,
    "reason": str,
}


def _flat(tree: Any) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(tree) if isinstance(v, mx.array)}


def non_finite_array(arrays: dict[str, mx.array]) -> str | None:
    """The name of the first floating-point array holding NaN or inf, or None (one
    evaluation for all of them)."""
    floats = [(k, v) for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.floating)]
    if not floats:
        return None
    finite = mx.stack([mx.all(mx.isfinite(v)) for _, v in floats])
    mx.eval(finite)
    if bool(mx.all(finite).item()):
        return None
    return next(k for (k, _), ok in zip(floats, finite.tolist()) if not ok)


def check_finite(root: str | os.PathLike, trainable: Any, optimizer_state: Any, extra) -> None:
    """Raise :class:`NonFiniteStateError` (naming the last finite checkpoint under ``root``)
    when any array a checkpoint would hold is NaN or inf."""
    groups = zip(FILES, (_flat(trainable), _flat(optimizer_state), dict(extra)))
    for file, arrays in groups:
        bad = non_finite_array(arrays)
        if bad is not None:
            try:
                last = latest_checkpoint(root)
            except CheckpointError:
                last = None
            raise NonFiniteStateError(bad, file, str(last) if last else None)


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
    # Before anything is written or pruned: a non-finite checkpoint would replace ``latest``
    # and pruning would then delete the last one a run can be resumed from.
    check_finite(root, trainable, optimizer_state, extra)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        save_arrays(tmp / FILES[0], _flat(trainable))
        save_arrays(tmp / FILES[1], _flat(optimizer_state))
        save_arrays(tmp / FILES[2], extra)
        hashes = {name: sha256_file(tmp / name) for name in FILES}
        body = {**state, "step": step, "sha256": hashes}
        body["state_sha256"] = state_digest(body)
        write_json(tmp / "state.json", body)
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


def state_digest(state: dict) -> str:
    """The sha256 of a state.json's fields but its own hash (sorted-key JSON)."""
    rest = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _step_of(path: Path) -> int:
    match = NAME.match(path.name)
    return int(match.group(1)) if match else -1


def _prune(root: Path, keep: int, current: str) -> None:
    # Complete checkpoints only, by step number (names sort wrongly past 9,999,999 steps);
    # the one just written, which ``latest`` names, always stays.
    done = sorted(
        (p for p in root.glob("step-*") if NAME.match(p.name) and (p / "state.json").is_file()),
        key=_step_of,
    )
    for old in done[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def remove_orphans(root: str | os.PathLike) -> list[Path]:
    """Delete checkpoint folders and pointer files a killed writer left half-written under
    ``root``; the paths removed. Only while no writer can be running (the run's lock)."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = remove_temporaries(root)
    for path in root.iterdir():
        if TEMPORARY.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder ``root/latest`` names, or None without a pointer. The pointer must name a
    ``step-N`` folder directly inside ``root`` (not a path elsewhere, not a link out)."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    if not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a file naming a checkpoint")
    with open(pointer, "rb") as handle:
        raw = handle.read(256)
    name = raw.decode("utf-8", errors="replace").strip()
    if not NAME.match(name):
        raise CheckpointError(
            f"{pointer} names {name[:80]!r}, not a checkpoint folder step-N inside {root}"
        )
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    if path.resolve().parent != root.resolve():
        raise CheckpointError(f"{pointer} names {path.name}, a link outside {root}")
    return path


def check_state(state: Any, path: Path) -> dict:
    """``state`` (a checkpoint's parsed state.json) if every field is what the writer
    writes; otherwise a CheckpointError naming the file and the field."""
    where = path / "state.json"
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a JSON object")

    def natural(key: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{where}: {key} is {value!r}, not a non-negative integer")

    if "step" not in state:
        raise CheckpointError(f"{where} has no step")
    natural("step", state["step"])
    for key, kind in _OPTIONAL.items():
        if key not in state:
            continue
        if kind is int:
            natural(key, state[key])
        elif not isinstance(state[key], kind):
            raise CheckpointError(f"{where}: {key} is {state[key]!r}, not a string")
    hashes = state.get("sha256")
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{where} has no sha256 table of its tensor files")
    for name in FILES:
        if not isinstance(hashes.get(name), str) or not _HEX64.match(hashes[name]):
            raise CheckpointError(f"{where}: sha256 of {name} is missing or not a sha256")
    own = state.get("state_sha256")
    # Checkpoints written before the state carried its own hash have none; one that has it
    # must match (an edit or a flipped bit in state.json).
    if own is not None and own != state_digest(state):
        raise CheckpointError(f"{where} is corrupt or was edited: its state_sha256 does not match")
    step = _step_of(path)
    if step >= 0 and step != state["step"]:
        raise CheckpointError(f"{where} says step {state['step']}, its folder {path.name}")
    return state


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict, dict]:
    """(state, trainable, optimizer, extra) from a checkpoint folder, checksums verified."""
    path = Path(path)
    state = check_state(read_json(path / "state.json", "checkpoint state"), path)
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if sha256_file(file) != state["sha256"][name]:
            raise CheckpointError(f"checkpoint file {file} is corrupt (sha256 mismatch)")
    trainable = load_arrays(path / FILES[0], "checkpoint weights")
    optimizer = load_arrays(path / FILES[1], "checkpoint optimizer state")
    extra = load_arrays(path / FILES[2], "checkpoint extra state")
    return state, trainable, optimizer, extra


def unflatten(flat: dict[str, mx.array]) -> Any:
    return tree_unflatten(list(flat.items()))
