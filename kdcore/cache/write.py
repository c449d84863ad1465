"""Writing a top-k teacher cache: each teacher over the train split, shard by shard,
atomically, resumable after an interruption."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kdcore.cache.format import DTYPES, FLOOR, FORMAT, SET_FORMAT, VERSION, _read_manifest
from kdcore.cache.provenance import local_provenance, served_provenance, teacher_identity
from kdcore.data.build import build_dataset
from kdcore.engine.distributed import DataParallel
from kdcore.engine.progress import Progress
from kdcore.engine.rundir import RunLock
from kdcore.errors import CheckpointError, SpecError
from kdcore.io import read_json, save_arrays, sha256_file, write_json
from kdcore.kernels.native import install_registered_kernels
from kdcore.signal.teacher import stable_log_softmax
from kdcore.spec.convert import converter
from kdcore.spec.load import load_spec
from kdcore.spec.schema import RunSpec
from kdcore.tokenizers.simple import fingerprint, load_tokenizer, save_tokenizer

__all__ = ["teacher_identity", "topk_logprobs", "write_cache"]  # identity: provenance's


def topk_logprobs(
    logits: mx.array, k: int, temperature: float = 1.0
) -> tuple[mx.array, mx.array, mx.array]:
    """(ids [.., K] int32, log-probs [.., K] float32, tail log-mass [..] float32).

    ``log p = z / T - logsumexp(z / T)``; the top-k are sorted most probable first; the tail
    is ``logsumexp`` of ``log p`` over the ids outside the top-k, floored at ``FLOOR``.
    """
    logp = stable_log_softmax(logits.astype(mx.float32) / temperature)
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


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_cache(
    spec: RunSpec | str | Path,
    output: str | Path,
    *,
    top_k: int | None = None,
    dtype: str = "float16",
    temperature: float = 1.0,
    shard_tokens: int = 1 << 20,
    batch_size: int = 16,
    overrides: list[str] | None = None,
    progress: bool | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> dict:
    """Cache every ``[[teachers]]`` entry with a ``path`` (a local model) or a ``server``
    into ``output/teacher-<i>``.

    ``top_k``: None caches a local teacher's top 64 and a served one's ``params.top_k``.
    A served teacher gives log-probs at temperature 1 only. ``on_shard(teacher, shard)`` is
    called after each shard is committed (tests use it to interrupt a run). A rerun with
    the same settings skips the shards already written. Returns the set manifest.
    """
    if not isinstance(spec, RunSpec):
        spec = load_spec(spec, overrides or [])
    if dtype not in DTYPES:
        raise SpecError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if top_k is not None and top_k < 1:
        raise SpecError(f"--top-k must be >= 1, got {top_k}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise SpecError(f"--temperature must be a finite number > 0, got {temperature}")
    if batch_size < 1:
        raise SpecError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_tokens < 1:
        raise SpecError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    # The teacher runs on the kernels a run installs (the layers' softmax and SwiGLU): a
    # cache holds the live teacher's numbers, bit for bit, whatever ran before in the process.
    install_registered_kernels()
    teachers = [(i, ref) for i, ref in enumerate(spec.teachers) if ref.server or ref.path]
    if not teachers:
        raise SpecError(
            'the spec has no [[teachers]] entry with path = "MODEL_DIR" or server = "URL" to cache'
        )
    served = [i for i, ref in teachers if ref.server]
    if served and temperature != 1.0:
        raise SpecError(
            f"--temperature {temperature:g}: a served teacher gives log-probs at temperature "
            f"1 only (teachers[{served[0]}]); cache it at 1 and distil with "
            'tail = "renormalize" at any temperature'
        )
    out = Path(output)
    lock = None
    if DataParallel().is_main:  # the processes of one mlx.launch job share the folder
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create the cache folder {out}: {exc}") from None
        lock = RunLock(out, "kd cache")
    try:
        return _write_cache(
            spec,
            out,
            teachers,
            top_k=top_k,
            dtype=dtype,
            temperature=temperature,
            shard_tokens=shard_tokens,
            batch_size=batch_size,
            progress=progress,
            on_shard=on_shard,
        )
    finally:
        if lock is not None:
            lock.release()


def _write_cache(
    spec: RunSpec,
    out: Path,
    teachers: list,
    *,
    top_k: int | None,
    dtype: str,
    temperature: float,
    shard_tokens: int,
    batch_size: int,
    progress: bool | None,
    on_shard: Callable[[int, int], None] | None,
) -> dict:
    dataset = build_dataset(spec)
    data = _data_record(dataset, spec)
    if data["examples"] == 0:
        raise SpecError("the train split is empty: more data or a smaller seq_len @ $.data")
    rows_per_shard = max(1, shard_tokens // data["seq_len"])
    entries = [
        {"dir": f"teacher-{n}", "spec_index": i, **_origin(spec, i, ref)}
        for n, (i, ref) in enumerate(teachers)
    ]
    write_json(
        out / "manifest.json", {"format": SET_FORMAT, "version": VERSION, "teachers": entries}
    )
    for n, (i, ref) in enumerate(teachers):
        # one teacher loaded (or connected) at a time
        source = (_ServedTeacher if ref.server else _LocalTeacher)(spec, i, ref, dataset, top_k)
        try:
            _write_teacher(
                source,
                out / f"teacher-{n}",
                dataset,
                data,
                dtype=dtype,
                temperature=temperature,
                rows_per_shard=rows_per_shard,
                batch_size=batch_size,
                progress=progress,
                on_shard=(lambda s, n=n: on_shard(n, s)) if on_shard else None,
                label=f"cache teacher-{n}",
            )
        finally:
            source.close()
    return read_json(out / "manifest.json", "cache manifest")


class _LocalTeacher:
    """A teacher folder, loaded here: what ``kd cache`` writes of it, and its top-k."""

    def __init__(self, spec: RunSpec, i: int, ref: Any, dataset: Any, top_k: int | None):
        from kdcore.models.io import count_parameters, load_model
        from kdcore.models.mlxlm import locate_model

        # params.dtype as the run reads it
        folder = locate_model(ref.path, Path(spec.base_dir), f"$.teachers[{i}].path")
        where = f"$.teachers[{i}].params.dtype"
        self.model, architecture, config = load_model(
            folder, (ref.params or {}).get("dtype"), where
        )
        self.model.eval()
        self.tokenizer = load_tokenizer(folder)
        first = dataset.batch(0, 1, "train")["input_ids"][:, :1]
        self.vocab = int(self.model(mx.array(first)).logits.shape[-1])
        self.k = 64 if top_k is None else top_k
        if self.k > self.vocab:
            raise SpecError(
                f"--top-k {self.k} is larger than the teacher's vocabulary {self.vocab}"
            )
        self.record = {
            "identity": teacher_identity(folder),
            "path": str(folder),
            "architecture": architecture,
            "num_parameters": count_parameters(self.model),
            "config": converter.unstructure(config),
        }
        self.provenance = local_provenance(folder, str(ref.path))

    def topk(self, ids: np.ndarray, temperature: float) -> tuple[mx.array, mx.array, mx.array]:
        return topk_logprobs(self.model(mx.array(ids)).logits, self.k, temperature)

    def close(self) -> None:
        pass


class _ServedTeacher:
    """A teacher behind a server (``kdcore.teachers.served``): its top-k, asked batch by
    batch, and what ``kd cache`` writes of it (the token never)."""

    def __init__(self, spec: RunSpec, i: int, ref: Any, dataset: Any, top_k: int | None):
        import attrs

        from kdcore.registry.setup import Setup
        from kdcore.teachers.served import ServedTeacher, ServedTeacherConfig

        config = ref.config
        if not isinstance(config, ServedTeacherConfig):  # an entry that reads a cache
            known = {f.name for f in attrs.fields(ServedTeacherConfig)}
            params = {k: v for k, v in (ref.params or {}).items() if k in known}
            config = converter.structure(params, ServedTeacherConfig)
        if top_k is not None:
            config = attrs.evolve(config, top_k=top_k)
        config = attrs.evolve(config, prefetch=0)  # asked batch by batch below
        setup = Setup(
            base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec, teacher=ref,
            extras={"dataset": dataset},
        )  # fmt: skip
        self.teacher = ServedTeacher(config, setup)
        self.tokenizer = dataset.tokenizer  # the served ids are the run's (checked by kd)
        self.vocab, self.k = self.teacher.vocab_size, config.top_k
        recorded = self.teacher.provenance()
        self.record = {
            "identity": recorded["identity"],
            "path": None,
            "server": recorded["server"],
            "architecture": None,
            "num_parameters": self.teacher.num_parameters,
            "config": None,
        }
        self.provenance = served_provenance(recorded)

    def topk(self, ids: np.ndarray, temperature: float) -> tuple[mx.array, mx.array, mx.array]:
        return tuple(mx.array(a) for a in self.teacher.score(ids))

    def close(self) -> None:
        self.teacher.close()


def _origin(spec: RunSpec, i: int, ref: Any) -> dict:
    """Where teacher ``i`` comes from, as the set manifest lists it."""
    if ref.server:
        from kdcore.teachers.served import public_address, server_address

        return {
            "path": None,
            "server": public_address(server_address(ref.server, f"$.teachers[{i}].server")),
        }
    from kdcore.models.mlxlm import locate_model

    # a .gguf file or a hub name becomes its local folder
    return {"path": str(locate_model(ref.path, Path(spec.base_dir), f"$.teachers[{i}].path"))}


def _write_teacher(
    source: _LocalTeacher | _ServedTeacher,
    out: Path,
    dataset,
    data: dict,
    *,
    dtype: str,
    temperature: float,
    rows_per_shard: int,
    batch_size: int,
    progress: bool | None,
    on_shard: Callable[[int], None] | None,
    label: str,
) -> dict:
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": source.record,
        "provenance": source.provenance,
        "tokenizer_hash": fingerprint(source.tokenizer),
        "data": data,
        "k": source.k,
        "capture_temperature": float(temperature),
        "vocab_size": source.vocab,
        "seq_len": data["seq_len"],
        "dtypes": {"topk_ids": "int32", "topk_logprobs": dtype, "tail_logmass": "float32"},
        "rows_per_shard": rows_per_shard,
        "floor": FLOOR,
    }
    manifest_path = out / "manifest.json"
    done: dict[int, dict] = {}
    if manifest_path.exists():
        old = _read_manifest(out)
        # a cache begun before provenance was recorded: its teacher identity still decides
        fields = [k for k in settings if k != "teacher" and (k != "provenance" or k in old)]
        changed = [key for key in fields if old.get(key) != settings[key]]
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
    save_tokenizer(source.tokenizer, out)

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
            arrays = _shard_arrays(source, chunk["input_ids"], temperature, dtype, batch_size, tick)
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
    source: _LocalTeacher | _ServedTeacher,
    input_ids: np.ndarray,
    temperature: float,
    dtype: str,
    batch_size: int,
    tick: Callable[[int], None],
) -> dict[str, mx.array]:
    ids_parts, lp_parts, tail_parts = [], [], []
    for lo in range(0, len(input_ids), batch_size):
        ids, logp, tail = source.topk(np.asarray(input_ids[lo : lo + batch_size]), temperature)
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
