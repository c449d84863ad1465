"""The offline teacher cache: a teacher's top-k log-probabilities, computed once, reused.

``kd cache SPEC --output DIR`` runs each ``[[teachers]]`` entry that has a ``path`` over the
spec's training split, example by example in index order, and keeps per token position:

- ``topk_ids`` [rows, L, K] int32: the K most probable token ids, most probable first;
- ``topk_logprobs`` [rows, L, K] float16 / bfloat16: ``log p_i = z_i / Tc - logsumexp(z / Tc)``
  at the capture temperature ``Tc``;
- ``tail_logmass`` [rows, L] float32: ``log(1 - sum_i p_i)`` over the top-k, computed as the
  log-sum-exp of the log-probabilities *outside* the top-k (no cancellation near 1).

Log-probabilities below ``FLOOR`` (probability 0 in float32, e.g. the empty tail when
K = V) are stored as ``FLOOR`` so that arithmetic on them stays finite.

Layout on disk::

    DIR/manifest.json                     the set: {"format": "kd-teacher-cache-set", ...}
    DIR/teacher-0/manifest.json           one teacher's cache (fields: docs/cache.md)
    DIR/teacher-0/tokenizer.json          the teacher's tokenizer (what the ids index)
    DIR/teacher-0/shard-00000.safetensors rows [start, end) of the train split

Shards are written atomically and the manifest is rewritten after each one, so an
interrupted run resumes at the first missing shard. Training reads the shards through
``mmap`` (the ``cache`` teacher source) and never loads the teacher model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mmap
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from kdcore.distributed import DataParallel
from kdcore.errors import CheckpointError, SpecError
from kdcore.io import read_json, save_arrays, sha256_file, write_json
from kdcore.plugins import get_registry
from kdcore.progress import Progress
from kdcore.setup import Setup
from kdcore.signal import TeacherSignal
from kdcore.spec import RunSpec, converter, load_spec
from kdcore.tokenizer import fingerprint, load_tokenizer, save_tokenizer

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


# ---------------------------------------------------------------- top-k of a teacher


def topk_logprobs(
    logits: mx.array, k: int, temperature: float = 1.0
) -> tuple[mx.array, mx.array, mx.array]:
    """(ids [.., K] int32, log-probs [.., K] float32, tail log-mass [..] float32).

    ``log p = z / T - logsumexp(z / T)``; the top-k are sorted most probable first; the tail
    is ``logsumexp`` of ``log p`` over the ids outside the top-k, floored at ``FLOOR``.
    """
    z = logits.astype(mx.float32) / temperature
    logp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    V = logp.shape[-1]
    if k > V:
        raise ValueError(f"top-k {k} is larger than the vocabulary {V}")
    if k < V:
        part = mx.argpartition(-logp, k - 1, axis=-1)[..., :k].astype(mx.int32)
    else:
        part = mx.broadcast_to(mx.arange(V, dtype=mx.int32), logp.shape)
    values = mx.take_along_axis(logp, part, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(part, order, axis=-1)
    values = mx.take_along_axis(values, order, axis=-1)
    outside = mx.put_along_axis(logp, ids, mx.array(-math.inf, mx.float32), axis=-1)
    tail = mx.maximum(mx.logsumexp(outside, axis=-1), FLOOR)
    return ids, mx.maximum(values, FLOOR), tail


# ---------------------------------------------------------------- identities


def teacher_identity(directory: Path) -> str:
    """sha256 over the teacher's ``config.json`` (canonical JSON) and its weight files."""
    digest = hashlib.sha256()
    config = read_json(directory / "config.json", "teacher config")
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(directory.glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(sha256_file(weights).encode())
    return digest.hexdigest()[:16]


def build_dataset(spec: RunSpec, setup: Setup | None = None):
    """The spec's dataset, built exactly as ``kd distill`` builds it."""
    base = setup or Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)
    component = get_registry().get("dataset", spec.data.name)
    return component.factory(spec.data.config, attrs.evolve(base, tokenizer=None))


def _data_record(dataset, spec: RunSpec) -> dict:
    first = dataset.batch(0, 1, "train")
    return {
        "fingerprint": dataset.fingerprint(),
        "tokenizer_hash": fingerprint(dataset.tokenizer),
        "component": spec.data.name,
        "params": converter.unstructure(spec.data.config),
        "split": "train",
        "examples": dataset.num_examples("train"),
        "seq_len": int(first["input_ids"].shape[1]),
    }


# ---------------------------------------------------------------- writing


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_cache(
    spec: RunSpec | str | Path,
    output: str | Path,
    *,
    top_k: int = 64,
    dtype: str = "float16",
    temperature: float = 1.0,
    shard_tokens: int = 1 << 20,
    batch_size: int = 16,
    overrides: list[str] | None = None,
    progress: bool | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> dict:
    """Cache every ``[[teachers]]`` entry with a ``path`` into ``output/teacher-<i>``.

    ``on_shard(teacher, shard)`` is called after each shard is committed (tests use it to
    interrupt a run). A rerun with the same settings skips the shards already written.
    Returns the set manifest.
    """
    if not isinstance(spec, RunSpec):
        spec = load_spec(spec, overrides or [])
    if dtype not in DTYPES:
        raise SpecError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if top_k < 1:
        raise SpecError(f"--top-k must be >= 1, got {top_k}")
    if not temperature > 0:
        raise SpecError(f"--temperature must be > 0, got {temperature}")
    teachers = [(i, ref) for i, ref in enumerate(spec.teachers) if ref.path]
    if not teachers:
        raise SpecError('the spec has no [[teachers]] entry with path = "MODEL_DIR" to cache')
    out = Path(output)
    dataset = build_dataset(spec)
    data = _data_record(dataset, spec)
    if data["examples"] == 0:
        raise SpecError("the train split is empty: more data or a smaller seq_len @ $.data")
    rows_per_shard = max(1, shard_tokens // data["seq_len"])
    entries = [
        {"dir": f"teacher-{n}", "spec_index": i, "path": str(spec.path(ref.path))}
        for n, (i, ref) in enumerate(teachers)
    ]
    write_json(
        out / "manifest.json", {"format": SET_FORMAT, "version": VERSION, "teachers": entries}
    )
    for n, (_i, ref) in enumerate(teachers):
        _write_teacher(
            Path(spec.path(ref.path)),
            out / f"teacher-{n}",
            dataset,
            data,
            top_k=top_k,
            dtype=dtype,
            temperature=temperature,
            rows_per_shard=rows_per_shard,
            batch_size=batch_size,
            progress=progress,
            on_shard=(lambda s, n=n: on_shard(n, s)) if on_shard else None,
            label=f"cache teacher-{n}",
        )
    return read_json(out / "manifest.json", "cache manifest")


def _write_teacher(
    teacher_dir: Path,
    out: Path,
    dataset,
    data: dict,
    *,
    top_k: int,
    dtype: str,
    temperature: float,
    rows_per_shard: int,
    batch_size: int,
    progress: bool | None,
    on_shard: Callable[[int], None] | None,
    label: str,
) -> dict:
    from kdcore.models import count_parameters, load_model

    model, architecture, config = load_model(teacher_dir)
    model.eval()
    tokenizer = load_tokenizer(teacher_dir)
    vocab = int(model(mx.array(dataset.batch(0, 1, "train")["input_ids"][:, :1])).logits.shape[-1])
    if top_k > vocab:
        raise SpecError(f"--top-k {top_k} is larger than the teacher's vocabulary {vocab}")
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {
            "identity": teacher_identity(teacher_dir),
            "path": str(teacher_dir),
            "architecture": architecture,
            "num_parameters": count_parameters(model),
            "config": converter.unstructure(config),
        },
        "tokenizer_hash": fingerprint(tokenizer),
        "data": data,
        "k": top_k,
        "capture_temperature": float(temperature),
        "vocab_size": vocab,
        "seq_len": data["seq_len"],
        "dtypes": {"topk_ids": "int32", "topk_logprobs": dtype, "tail_logmass": "float32"},
        "rows_per_shard": rows_per_shard,
        "floor": FLOOR,
    }
    manifest_path = out / "manifest.json"
    done: dict[int, dict] = {}
    if manifest_path.exists():
        old = _read_manifest(out)
        changed = [key for key in settings if key != "teacher" and old.get(key) != settings[key]]
        if old.get("teacher", {}).get("identity") != settings["teacher"]["identity"]:
            changed.insert(0, "teacher identity")
        if changed:
            raise CheckpointError(
                f"{out} holds a cache made with different settings ({', '.join(changed)}); "
                "choose another --output or delete it"
            )
        for shard in old.get("shards", []):
            path = out / shard["file"]
            if path.exists() and sha256_file(path) == shard["sha256"]:
                done[shard["index"]] = shard
    save_tokenizer(tokenizer, out)

    total_rows = data["examples"]
    count = math.ceil(total_rows / rows_per_shard)
    bar = Progress(total_rows * data["seq_len"], label, enabled=progress)
    rows_of = lambda shards: sum(s["rows"][1] - s["rows"][0] for s in shards)  # noqa: E731
    meter = {
        "start": time.perf_counter(),
        "line": time.perf_counter(),
        "computed": 0,
        "position": rows_of(done.values()) * data["seq_len"],
    }

    def tick(tokens: int, force: bool = False) -> None:
        # A log line every 10 s when stderr is not a terminal; the bar otherwise.
        now = time.perf_counter()
        meter["computed"] += tokens
        meter["position"] += tokens
        rate = meter["computed"] / max(now - meter["start"], 1e-9)
        line = force or now - meter["line"] >= 10.0
        if line:
            meter["line"] = now
        bar.update(meter["position"], f"{rate:,.0f} tok/s", force_line=line)

    dp = DataParallel()  # under mlx.launch each process writes every size-th shard

    def commit(shards: dict[int, dict], complete: bool) -> None:
        if not dp.is_main:
            return  # the manifest is rank 0's
        listed = [shards[i] for i in sorted(shards)]
        write_json(
            manifest_path,
            {
                **settings,
                "shards": listed,
                "token_count": rows_of(listed) * data["seq_len"],
                "complete": complete,
            },
        )

    commit(done, len(done) == count)
    try:
        for index, chunk in enumerate(dataset.batches(rows_per_shard, "train")):
            if index in done or index % dp.size != dp.rank:
                continue
            arrays = _shard_arrays(
                model, chunk["input_ids"], top_k, temperature, dtype, batch_size, tick
            )
            path = out / shard_name(index)
            save_arrays(path, arrays, metadata={"format": FORMAT})
            first = int(chunk["example_index"][0])
            done[index] = {
                "index": index,
                "file": path.name,
                "rows": [first, first + len(chunk["input_ids"])],
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
            commit(done, len(done) == count)
            tick(0, force=True)
            if on_shard is not None:
                on_shard(index)
    finally:
        bar.close()
    if dp.size > 1:
        dp.barrier()  # every shard is on disk
        for index in range(count):
            path, first = out / shard_name(index), index * rows_per_shard
            done[index] = {
                "index": index,
                "file": path.name,
                "rows": [first, min(first + rows_per_shard, total_rows)],
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
        commit(done, True)
        dp.barrier()  # the manifest is complete before anyone reads it
    return read_json(manifest_path, "cache manifest")


def _shard_arrays(
    model,
    input_ids: np.ndarray,
    k: int,
    temperature: float,
    dtype: str,
    batch_size: int,
    tick: Callable[[int], None],
) -> dict[str, mx.array]:
    ids_parts, lp_parts, tail_parts = [], [], []
    for lo in range(0, len(input_ids), batch_size):
        logits = model(mx.array(input_ids[lo : lo + batch_size])).logits
        ids, logp, tail = topk_logprobs(logits, k, temperature)
        logp = logp.astype(DTYPES[dtype])
        mx.eval(ids, logp, tail)
        ids_parts.append(ids)
        lp_parts.append(logp)
        tail_parts.append(tail)
        tick(int(ids.shape[0] * ids.shape[1]))
    return {
        "topk_ids": mx.concatenate(ids_parts, axis=0),
        "topk_logprobs": mx.concatenate(lp_parts, axis=0),
        "tail_logmass": mx.concatenate(tail_parts, axis=0),
    }


# ---------------------------------------------------------------- reading


def map_safetensors(path: Path, what: str = "shard") -> dict[str, tuple[np.ndarray, str]]:
    """Memory-map every tensor of a safetensors file: name -> (read-only array, dtype name).

    The header (8-byte little-endian length, then JSON) is parsed here so that a file cut
    short is reported as truncated rather than read past its end. ``safetensors.numpy``
    would read the whole file into memory, and has no bfloat16.
    """
    if not path.exists():
        raise CheckpointError(f"{what} {path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{what} {path} is truncated ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise CheckpointError(f"{what} {path} is truncated (header runs past the end)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{what} {path} has a corrupt header: {exc}") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{what} {path} has a corrupt header")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # Training reads rows in shuffled order: read-ahead would only pull in neighbours.
        mapped.madvise(mmap.MADV_RANDOM)
    base = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            np_dtype, dtype_name = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{what} {path}: bad header entry for {name!r}") from exc
        if base + end > size:
            raise CheckpointError(
                f"{what} {path} is truncated: {name!r} ends at byte {base + end}, "
                f"the file has {size}"
            )
        if end - begin != int(np.prod(shape)) * np.dtype(np_dtype).itemsize:
            raise CheckpointError(f"{what} {path}: {name!r} has {end - begin} bytes for {shape}")
        count = int(np.prod(shape))
        array = np.frombuffer(mapped, dtype=np_dtype, count=count, offset=base + begin)
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
    return manifest


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
    return [directory / entry["dir"] for entry in manifest.get("teachers", [])]


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


class CacheReader:
    """One teacher's cache, memory-mapped; ``rows(example_index)`` gathers rows by index."""

    def __init__(self, directory: str | Path, verify_checksums: bool = True):
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest["format"] == SET_FORMAT:
            raise CheckpointError(f"{self.directory} holds several teacher caches; open one")
        if not manifest.get("complete"):
            raise CheckpointError(
                f"cache {self.directory} is incomplete ({len(manifest.get('shards', []))} "
                "shards): rerun kd cache with the same --output to finish it"
            )
        self.manifest = manifest
        self.k = manifest["k"]
        self.seq_len = manifest["seq_len"]
        self.vocab_size = manifest["vocab_size"]
        self.capture_temperature = manifest["capture_temperature"]
        self.bfloat16 = manifest["dtypes"]["topk_logprobs"] == "bfloat16"
        self.starts, self.shards = [], []
        problems = _layout_problems(self.directory, manifest)
        for shard in manifest["shards"]:
            tensors, errors = _check_shard(self.directory, manifest, shard, verify_checksums)
            problems.extend(errors)
            self.starts.append(shard["rows"][0])
            self.shards.append({k: v[0] for k, v in tensors.items()})
        if problems:
            raise CheckpointError("\n".join(problems))
        self.num_rows = manifest["shards"][-1]["rows"][1] if manifest["shards"] else 0
        self._starts = np.asarray(self.starts)

    def rows(self, example_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, L, K], log-probs [B, L, K] in the stored bits, tail [B, L]) for the rows."""
        index = np.asarray(example_index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_rows):
            raise CheckpointError(
                f"cache {self.directory} has {self.num_rows} rows; asked for row {index.max()}"
            )
        which = np.searchsorted(self._starts, index, side="right") - 1
        ids = np.empty((len(index), self.seq_len, self.k), np.int32)
        first = self.shards[0]["topk_logprobs"] if self.shards else None
        logp = np.empty(
            (len(index), self.seq_len, self.k), first.dtype if first is not None else np.float16
        )
        tail = np.empty((len(index), self.seq_len), np.float32)
        for shard in np.unique(which):
            picked = np.nonzero(which == shard)[0]
            local = index[picked] - self.starts[shard]
            arrays = self.shards[shard]
            ids[picked] = arrays["topk_ids"][local]
            logp[picked] = arrays["topk_logprobs"][local]
            tail[picked] = arrays["tail_logmass"][local]
        return ids, logp, tail

    def signal(self, example_index: np.ndarray) -> TeacherSignal:
        ids, logp, tail = self.rows(example_index)
        logprobs = mx.array(logp)
        if self.bfloat16:
            logprobs = logprobs.view(mx.bfloat16)
        return TeacherSignal(
            vocab_size=self.vocab_size,
            topk_ids=mx.array(ids),
            topk_logprobs=logprobs,
            tail_logmass=mx.array(tail),
            capture_temperature=self.capture_temperature,
        )


# ---------------------------------------------------------------- the teacher source


@attrs.define
class CacheSourceConfig:
    """``teacher``: which teacher of a multi-teacher cache directory (``DIR/teacher-N``);
    ``verify_checksums``: hash every shard when the run starts (off for very large caches:
    shapes and sizes are still checked)."""

    teacher: int | None = None
    verify_checksums: bool = True


def resolve_cache_dir(directory: Path, teacher: int | None) -> Path:
    subs = teacher_dirs(directory)
    if teacher is not None:
        if not 0 <= teacher < len(subs):
            raise SpecError(
                f"cache {directory} has no teacher {teacher} (it holds {len(subs)}) "
                "@ $.teachers.params.teacher"
            )
        return subs[teacher]
    if len(subs) != 1:
        raise SpecError(
            f"cache {directory} holds {len(subs)} teacher caches; name one with "
            f'cache = "{directory}/teacher-0" or params = {{teacher = 0}}'
        )
    return subs[0]


class CacheTeacher:
    """A teacher read from an offline top-k cache (``[[teachers]] cache = "DIR"``).

    The teacher model is never loaded. At build the cache must match the run: the data
    fingerprint and the data tokenizer's hash equal the manifest's, the train split has the
    manifest's number of examples and sequence length, and the stored tokenizer is the one
    the manifest names. ``signal`` looks rows up by ``batch["example_index"]``.
    """

    def __init__(self, config: CacheSourceConfig, setup: Setup):
        ref = setup.teacher
        if ref is None or not ref.cache:
            raise SpecError('the cache teacher source needs cache = "CACHE_DIR" @ $.teachers')
        self.path = resolve_cache_dir(Path(setup.resolve(ref.cache)), config.teacher)
        self.reader = CacheReader(self.path, config.verify_checksums)
        manifest = self.reader.manifest
        self.manifest = manifest
        self.tokenizer = load_tokenizer(self.path)
        if fingerprint(self.tokenizer) != manifest["tokenizer_hash"]:
            raise CheckpointError(
                f"cache {self.path}: tokenizer.json (hash {fingerprint(self.tokenizer)}) is not "
                f"the tokenizer the cache was made with (hash {manifest['tokenizer_hash']})"
            )
        self.model = None
        self.config = None
        self.num_parameters = manifest["teacher"]["num_parameters"]
        dataset = setup.extras.get("dataset")
        if dataset is None:
            if setup.spec is None:
                raise SpecError("the cache teacher source checks the run's data: it needs the spec")
            dataset = build_dataset(setup.spec, setup)
        check_matches_data(self.path, manifest, dataset)

    def signal(self, batch: dict, capture: frozenset = frozenset(), student=None) -> TeacherSignal:
        if capture:
            raise SpecError(
                f"a top-k cache holds no {', '.join(sorted(capture))}: losses that need them "
                "need a live teacher (path = ...) @ $.teachers"
            )
        if "example_index" not in batch:
            raise SpecError("the batch has no example_index: the cache cannot find its rows")
        return self.reader.signal(np.array(batch["example_index"]))


def check_matches_data(path: Path, manifest: dict, dataset) -> None:
    """Raise ``CheckpointError`` listing each way ``dataset`` differs from the cache."""
    data = manifest["data"]
    problems = []
    run_fp, run_tok = dataset.fingerprint(), fingerprint(dataset.tokenizer)
    if run_fp != data["fingerprint"]:
        problems.append(
            f"data fingerprint {run_fp} of this run does not match the cache's "
            f"{data['fingerprint']}"
        )
    if run_tok != data["tokenizer_hash"]:
        problems.append(
            f"tokenizer hash {run_tok} of this run does not match the cache's "
            f"{data['tokenizer_hash']}"
        )
    examples = dataset.num_examples("train")
    if examples != data["examples"]:
        problems.append(f"the train split has {examples} examples, the cache {data['examples']}")
    if examples:
        seq_len = int(dataset.batch(0, 1, "train")["input_ids"].shape[1])
        if seq_len != manifest["seq_len"]:
            problems.append(f"seq_len {seq_len} of this run, {manifest['seq_len']} in the cache")
    if dataset.tokenizer.vocab_size > manifest["vocab_size"]:
        problems.append(
            f"the run's vocabulary ({dataset.tokenizer.vocab_size}) is larger than the "
            f"cached teacher's ({manifest['vocab_size']})"
        )
    if problems:
        raise CheckpointError(
            f"cache {path} was not made for this run's data: " + "; ".join(problems)
        )


# ---------------------------------------------------------------- kd cache


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cache",
        help="run the teachers once and store their top-k log-probs (or --verify a cache)",
        description="Write an offline top-k teacher cache for SPEC's training data.",
    )
    p.add_argument("spec", nargs="?", help="TOML or JSON spec whose [[teachers]] have path")
    p.add_argument("--output", "-o", help="cache directory")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float16",
        help="storage of the log-probs (float32 for exact reference caches)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="capture temperature")
    p.add_argument("--shard-tokens", type=int, default=1 << 20, help="token positions per shard")
    p.add_argument("--batch-size", type=int, default=16, help="rows per teacher forward")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verify", metavar="DIR", help="check every shard of an existing cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    if args.verify:
        report = verify_cache(args.verify)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for name, info in report.items():
                print(
                    f"{args.verify}/{name}: ok, {info['shards']} shards, {info['tokens']} tokens, "
                    f"{info['bytes'] / max(info['tokens'], 1):.1f} bytes/token (k={info['k']})"
                )
        return 0
    if not args.spec or not args.output:
        print("error: kd cache needs SPEC and --output DIR (or --verify DIR)", file=sys.stderr)
        return 2
    manifest = write_cache(
        args.spec,
        args.output,
        top_k=args.top_k,
        dtype=args.dtype,
        temperature=args.temperature,
        shard_tokens=args.shard_tokens,
        batch_size=args.batch_size,
        overrides=args.set,
    )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        for entry in manifest["teachers"]:
            print(f"{args.output}/{entry['dir']}: cache of {entry['path']}")
    return 0
