"""Reading a top-k teacher cache: shards mapped from disk, checked against the dataset, and
the ``cache`` teacher source."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs
import mlx.core as mx
import numpy as np

from kdcore.cache.format import (
    SET_FORMAT,
    _check_shard,
    _layout_problems,
    _read_manifest,
    teacher_dirs,
)
from kdcore.cache.provenance import chat_template_hash, check_provenance, teacher_identity
from kdcore.data.build import build_dataset
from kdcore.errors import CheckpointError, SpecError
from kdcore.registry.setup import Setup
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.validators import positive
from kdcore.tokenizers.simple import fingerprint, load_tokenizer


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


@attrs.define
class CacheSourceConfig:
    """``teacher``: which teacher of a multi-teacher cache directory (``DIR/teacher-N``);
    ``verify_checksums``: hash every shard when the run starts (off for very large caches:
    shapes and sizes are still checked).

    What the cache must have been made with (None: not checked; with the entry's ``path``
    or ``server`` naming its origin, ``kdcore.cache.provenance``): ``model``,
    ``protocol``, ``top_k``, ``temperature`` (the capture temperature), ``vocab_size``."""

    teacher: int | None = None
    verify_checksums: bool = True
    model: str | None = None
    protocol: Literal["kd", "openai"] | None = None
    top_k: int | None = attrs.field(default=None, validator=positive)
    temperature: float | None = attrs.field(default=None, validator=positive)
    vocab_size: int | None = attrs.field(default=None, validator=positive)


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
        teachers = getattr(setup.spec, "teachers", None) or [ref]
        where = f"$.teachers[{next((i for i, t in enumerate(teachers) if t is ref), 0)}]"
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
        check_provenance(self.path, manifest, expected_provenance(ref, config, setup, where))
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


def expected_provenance(ref, config: CacheSourceConfig, setup: Setup, where: str) -> dict:
    """What a ``cache`` entry says its cache was made from: field -> (value, spec place)."""
    expected: dict = {}
    if ref.server:
        from kdcore.teachers.served import public_address, server_address

        address = public_address(server_address(ref.server, f"{where}.server"))
        expected["source"] = ("server", f"{where}.server")
        expected["server"] = (address, f"{where}.server")
    elif ref.path:
        from kdcore.models.mlxlm import locate_model

        folder = locate_model(ref.path, Path(setup.base_dir), f"{where}.path")
        expected["source"] = ("model", f"{where}.path")
        expected["identity"] = (teacher_identity(folder), f"{where}.path")
        expected["tokenizer_hash"] = (fingerprint(load_tokenizer(folder)), f"{where}.path")
        expected["chat_template_hash"] = (chat_template_hash(folder), f"{where}.path")
    fields = {"model": "model", "protocol": "protocol", "top_k": "k"}
    fields.update(temperature="temperature", vocab_size="vocab_size")
    for key, field in fields.items():
        value = getattr(config, key, None)
        if value is not None:
            expected[field] = (value, f"{where}.params.{key}")
    return expected


def cached_teacher_folder(spec, ref) -> tuple[Path | None, str]:
    """(model folder, note) of the teacher a ``cache = DIR`` entry was captured from, for
    what needs its weights (``kd eval``'s teacher figures): the folder the cache's manifest
    records, else the ``teacher_path`` the student initializer copies from; each is taken
    only when its config and weights still hash to the manifest's teacher identity. None,
    with the reason in ``note``, when no such folder is known."""
    config = ref.config
    try:
        directory = resolve_cache_dir(Path(spec.path(ref.cache)), getattr(config, "teacher", None))
        teacher = _read_manifest(directory)["teacher"]
    except (CheckpointError, SpecError) as exc:
        return None, f"the cache cannot be read: {exc}"
    candidates = []
    recorded = teacher.get("path")  # as kd cache resolved it
    if isinstance(recorded, str) and recorded:
        candidates.append(Path(recorded))
    if ref.path:  # the folder the entry names as the cache's origin
        candidates.append(spec.path(ref.path))
    named = getattr(spec.student.init.config, "teacher_path", None)  # relative to the spec
    if isinstance(named, str) and named:
        candidates.append(spec.path(named))
    tried = []
    for folder in candidates:
        tried.append(str(folder))
        try:
            if folder.is_dir() and teacher_identity(folder) == teacher["identity"]:
                return folder, f"the cached teacher, from {folder}"
        except CheckpointError:
            continue  # no readable config.json: not it
    if not tried:
        return None, f"the cache {directory} does not record its teacher's folder"
    return None, (
        f"the cache {directory}'s teacher is not at {' or '.join(tried)} any more "
        "(missing, or its weights changed since it was cached)"
    )


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
