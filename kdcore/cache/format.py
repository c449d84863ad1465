"""The on-disk format of a top-k teacher cache: constants, manifests, shard headers and the
checks that a cache is whole (docs/cache.md)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from kdcore.errors import CheckpointError
from kdcore.io import check_safetensors, read_json, sha256_file

FORMAT = "kd-teacher-cache"


SET_FORMAT = "kd-teacher-cache-set"


VERSION = 1


FLOOR = -1.0e4  # exp(-1e4) == 0 in float32 and float64


DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


# safetensors dtype tag -> (numpy dtype used to map the bytes, our name)
_ST_DTYPES = {
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),  # NumPy has no bfloat16: map the bits, view in MLX
    "F32": (np.float32, "float32"),
    "I32": (np.int32, "int32"),
}


def map_safetensors(path: Path, what: str = "shard") -> dict[str, tuple[np.ndarray, str]]:
    """Memory-map every tensor of a safetensors file: name -> (read-only array, dtype name).

    The header is checked first (:func:`kdcore.io.check_safetensors`: a file cut short is
    reported as truncated, never read past its end; shapes and offsets are data, not
    trusted). ``safetensors.numpy`` would read the whole file into memory, and has no
    bfloat16.
    """
    if not path.exists():
        raise CheckpointError(f"{what} {path} is missing")
    header = check_safetensors(path, what)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # Training reads rows in shuffled order: read-ahead would only pull in neighbours.
        mapped.madvise(mmap.MADV_RANDOM)
    base = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(
                f"{what} {path}: {name!r} has dtype {info['dtype']}, not one a cache uses"
            )
        np_dtype, dtype_name = _ST_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        count = int(np.prod(shape))
        array = np.frombuffer(
            mapped, dtype=np_dtype, count=count, offset=base + info["data_offsets"][0]
        )
        tensors[name] = (array.reshape(shape), dtype_name)
    return tensors


def _check_shard(
    directory: Path, manifest: dict, shard: dict, checksum: bool
) -> tuple[dict, list[str]]:
    """Map one shard and compare it with the manifest: (tensors, problems naming the shard)."""
    path = directory / shard["file"]
    try:
        tensors = map_safetensors(path)
    except CheckpointError as exc:
        return {}, [str(exc)]
    rows = shard["rows"][1] - shard["rows"][0]
    L, K = manifest["seq_len"], manifest["k"]
    expected = {
        "topk_ids": ((rows, L, K), manifest["dtypes"]["topk_ids"]),
        "topk_logprobs": ((rows, L, K), manifest["dtypes"]["topk_logprobs"]),
        "tail_logmass": ((rows, L), manifest["dtypes"]["tail_logmass"]),
    }
    problems = []
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            problems.append(f"shard {path} has no tensor {name!r}")
            continue
        array, got = tensors[name]
        if tuple(array.shape) != shape or got != dtype:
            problems.append(
                f"shard {path}: {name} is {got} {tuple(array.shape)}, the manifest says "
                f"{dtype} {shape}"
            )
    if checksum and not problems and sha256_file(path) != shard["sha256"]:
        problems.append(f"shard {path} does not match its sha256 checksum in the manifest")
    return tensors, problems


def _read_manifest(directory: Path) -> dict:
    manifest = read_json(directory / "manifest.json", "cache manifest")
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, SET_FORMAT):
        raise CheckpointError(f"{directory}/manifest.json is not a kd teacher cache manifest")
    missing = _missing_fields(manifest)
    if missing:
        raise CheckpointError(
            f"{directory}/manifest.json is damaged: missing or malformed {', '.join(missing)}"
        )
    escaping = _escaping_names(manifest)
    if escaping:
        raise CheckpointError(
            f"{directory}/manifest.json: "
            + "; ".join(f"{entry}, outside the cache folder" for entry in escaping)
        )
    return manifest


def is_plain_name(name: str) -> bool:
    """A file or folder name that stays inside its folder: no separator, not ``.``/``..``,
    not absolute (what the writer writes: ``shard-00000.safetensors``, ``teacher-0``)."""
    return name not in ("", ".", "..") and "\0" not in name and Path(name).name == name


def _escaping_names(manifest: dict) -> list[str]:
    """``field: name`` for each name in a manifest that would leave its folder."""
    if manifest["format"] == SET_FORMAT:
        entries = [(f"teachers[{i}]", t["dir"]) for i, t in enumerate(manifest["teachers"])]
    else:
        entries = [(f"shards[{i}]", s["file"]) for i, s in enumerate(manifest["shards"])]
    return [f"{field} is {name!r}" for field, name in entries if not is_plain_name(name)]


_TEACHER_FIELDS = {
    "k": int,
    "seq_len": int,
    "vocab_size": int,
    "capture_temperature": (int, float),
    "tokenizer_hash": str,
    "complete": bool,
    "shards": list,
    "dtypes": dict,
    "data": dict,
    "teacher": dict,
}


def _missing_fields(manifest: dict) -> list[str]:
    """Field names a manifest lacks or has with the wrong type (empty when it is sound)."""
    if manifest["format"] == SET_FORMAT:
        teachers = manifest.get("teachers")
        ok = isinstance(teachers, list) and all(
            isinstance(t, dict) and isinstance(t.get("dir"), str) for t in teachers
        )
        return [] if ok else ["teachers"]
    bad = [k for k, t in _TEACHER_FIELDS.items() if not isinstance(manifest.get(k), t)]
    if bad:
        return bad
    if set(manifest["dtypes"]) != {"topk_ids", "topk_logprobs", "tail_logmass"}:
        bad.append("dtypes")
    if not {"fingerprint", "tokenizer_hash", "examples"} <= set(manifest["data"]):
        bad.append("data")
    if not {"identity", "num_parameters"} <= set(manifest["teacher"]):
        bad.append("teacher")
    for i, shard in enumerate(manifest["shards"]):
        if not (
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and isinstance(shard.get("sha256"), str)
            and isinstance(shard.get("rows"), list)
            and len(shard["rows"]) == 2
            and all(isinstance(r, int) for r in shard["rows"])
        ):
            bad.append(f"shards[{i}]")
    return bad


def _layout_problems(directory: Path, manifest: dict) -> list[str]:
    """Shards must cover rows 0..examples in order, without gaps or overlaps."""
    problems, end = [], 0
    for shard in manifest["shards"]:
        start, stop = shard["rows"]
        if start != end or stop <= start:
            problems.append(
                f"{directory}/{shard['file']}: rows [{start}, {stop}) do not follow row {end}"
            )
        end = stop
    if manifest["complete"] and end != manifest["data"]["examples"]:
        problems.append(f"{directory}: shards cover {end} rows of {manifest['data']['examples']}")
    return problems


def teacher_dirs(directory: str | Path) -> list[Path]:
    """The teacher caches inside ``directory`` (itself, if it is one teacher's cache)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest["format"] == FORMAT:
        return [directory]
    if not manifest["teachers"]:
        raise CheckpointError(
            f"{directory} holds no teacher caches: its manifest lists none (an interrupted "
            "kd cache? rerun it with the same --output)"
        )
    return [directory / entry["dir"] for entry in manifest["teachers"]]


def verify_cache(directory: str | Path, checksum: bool = True) -> dict:
    """Check every shard of every teacher cache: present, complete, shapes and dtypes as the
    manifest says, sha256 equal. Raises ``CheckpointError`` naming each bad shard."""
    report, problems = {}, []
    for sub in teacher_dirs(directory):
        try:
            manifest = _read_manifest(sub)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if manifest["format"] != FORMAT:
            problems.append(f"{sub}/manifest.json is not one teacher's cache")
            continue
        if not manifest["complete"]:
            problems.append(f"{sub} is incomplete: rerun kd cache with the same --output")
        problems.extend(_layout_problems(sub, manifest))
        for shard in manifest["shards"]:
            problems.extend(_check_shard(sub, manifest, shard, checksum)[1])
        report[sub.name] = {
            "shards": len(manifest.get("shards", [])),
            "tokens": manifest.get("token_count", 0),
            "bytes": sum(s.get("bytes", 0) for s in manifest["shards"]),
            "k": manifest["k"],
        }
    if problems:
        raise CheckpointError("\n".join(problems))
    return report
