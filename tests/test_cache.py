"""The offline teacher cache: writing, reading, safety checks and training from it."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import attrs
import mlx.core as mx
import numpy as np
import pytest

import kdcore
from kdcore import app, testing
from kdcore.cache import format as kc_format
from kdcore.cache import read as kc_read
from kdcore.cache import write as kc_write
from kdcore.cli.main import main as kd_main
from kdcore.data.build import build_dataset
from kdcore.errors import CheckpointError
from kdcore.io import read_json
from kdcore.models.io import save_model
from kdcore.models.transformer import Transformer, TransformerConfig
from kdcore.registry.manager import get_registry, reset_registry
from kdcore.registry.setup import Setup
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.schema import TeacherRef
from kdcore.spec.tomlwrite import dumps as toml_dumps
from kdcore.tokenizers.simple import ByteTokenizer, CharTokenizer, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"
SEQ = 16
CHARS = 3600  # 3240 train tokens -> 202 rows of 16


# ---------------------------------------------------------------- helpers


def make_teacher(directory: Path, tokenizer, seed: int = 0, scale: float = 3.0) -> Path:
    """A randomly initialised tiny teacher; ``scale`` sharpens its distributions."""
    mx.random.seed(seed)
    config = TransformerConfig(
        vocab_size=tokenizer.vocab_size, dim=32, layers=2, heads=2, max_seq_len=SEQ
    )
    model = Transformer(config)
    model.embed.weight = model.embed.weight * scale
    save_model(model, directory, "transformer", config)
    save_tokenizer(tokenizer, directory)
    return directory


def spec_dict(
    teachers: list[dict],
    losses=None,
    data_path: Path = CORPUS,
    tokenizer: str = "byte",
    max_chars: int | None = CHARS,
) -> dict:
    params = {"path": str(data_path), "seq_len": SEQ, "val_fraction": 0.1, "tokenizer": tokenizer}
    if max_chars:
        params["max_chars"] = max_chars
    return {
        "run": {"name": "cache-test", "seed": 3},
        "data": {"name": "text", "params": params},
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 16, "layers": 1, "heads": 2, "max_seq_len": SEQ},
            }
        },
        "teachers": teachers,
        "losses": losses or [{"name": "ce"}],
        "train": {
            "steps": 3,
            "batch_size": 4,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 1},
    }


def open_cache(spec: dict, directory: Path, **params) -> kc_read.CacheTeacher:
    """The ``cache`` teacher source as a run builds it."""
    run_spec = app.load_spec(spec)
    config = app.make_config("teacher_source", "cache", **params)
    setup = Setup(
        base_dir=Path("."),
        seed=run_spec.run.seed,
        spec=run_spec,
        teacher=TeacherRef(cache=str(directory)),
    )
    return get_registry().get("teacher_source", "cache").factory(config, setup)


def train_rows(spec: dict) -> np.ndarray:
    dataset = build_dataset(app.load_spec(spec))
    return next(dataset.batches(10_000, "train"))["input_ids"]


def teacher_logits64(teacher_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    from kdcore.models.io import load_model

    model = load_model(teacher_dir)[0]
    return np.array(model(mx.array(input_ids)).logits.astype(mx.float32)).astype(np.float64)


def log_softmax64(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def to_mx(batch: dict) -> dict:
    return {k: mx.array(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A byte-level teacher, its spec, float64 reference logits and an fp16 k=8 cache."""
    root = tmp_path_factory.mktemp("cache-world")
    teacher = make_teacher(root / "teacher", ByteTokenizer())
    spec = spec_dict([{"path": str(teacher)}])
    logits = teacher_logits64(teacher, train_rows(spec))
    cache = root / "cache"
    kc_write.write_cache(app.load_spec(spec), cache, top_k=8, shard_tokens=40 * SEQ, progress=False)
    return {"root": root, "teacher": teacher, "spec": spec, "logits": logits, "cache": cache}


@pytest.fixture
def cache_copy(world, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(world["cache"], copy)
    return copy


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype,eps", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_round_trip_gives_the_teachers_top_k(world, tmp_path, dtype, eps):
    out = tmp_path / "c"
    kc_write.write_cache(
        app.load_spec(world["spec"]),
        out,
        top_k=8,
        dtype=dtype,
        shard_tokens=40 * SEQ,
        batch_size=7,
        progress=False,
    )
    teacher = open_cache(world["spec"], out)
    assert teacher.model is None and teacher.reader.k == 8
    dataset = build_dataset(app.load_spec(world["spec"]))
    batch = dataset.batch(5, 12)  # a permuted draw spanning several shards
    assert (
        len(
            np.unique(np.searchsorted(teacher.reader._starts, batch["example_index"], side="right"))
        )
        > 1
    )
    signal = teacher.signal(to_mx(batch))
    assert signal.is_sparse and signal.topk_ids.dtype == mx.int32
    assert signal.topk_logprobs.dtype == kc_format.DTYPES[dtype]
    ids = np.array(signal.topk_ids)
    stored = np.array(signal.topk_logprobs.astype(mx.float32)).astype(np.float64)
    ref = log_softmax64(world["logits"][batch["example_index"]])
    at_ids = np.take_along_axis(ref, ids, -1)
    # the stored values are the teacher's log-probs rounded to the storage dtype
    assert np.all(np.abs(stored - at_ids) <= eps * np.abs(at_ids) + 1e-5)
    # the ids are a top-k: nothing outside is more probable than anything inside
    outside = ref.copy()
    np.put_along_axis(outside, ids, -np.inf, -1)
    assert np.all(at_ids.min(-1) >= outside.max(-1) - 1e-5)
    assert np.all(np.diff(stored, axis=-1) <= 0)  # most probable first
    assert all(len(set(row)) == 8 for row in ids.reshape(-1, 8))  # distinct ids


def test_tail_mass_matches_float64(world):
    teacher = open_cache(world["spec"], world["cache"])
    index = np.arange(teacher.reader.num_rows)
    ids, _logp, tail = teacher.reader.rows(index)
    ref = log_softmax64(world["logits"])
    outside = ref.copy()
    np.put_along_axis(outside, ids, -np.inf, -1)
    m = outside.max(-1, keepdims=True)
    ref_tail = (m + np.log(np.exp(outside - m).sum(-1, keepdims=True)))[..., 0]
    assert tail.dtype == np.float32
    assert np.max(np.abs(tail - ref_tail)) < 1e-4
    # the same mass as 1 - sum of the top-k probabilities (float64 keeps ~1e-16 of it)
    mass = 1.0 - np.exp(np.take_along_axis(ref, ids, -1)).sum(-1)
    assert np.all(np.abs(np.exp(tail.astype(np.float64)) - mass) <= 1e-5 * mass + 1e-14)


def test_tail_is_stable_when_the_top_k_holds_almost_everything():
    logits = mx.array(np.array([[[60.0] + [0.0] * 31]], np.float32))
    ids, logp, tail = kc_write.topk_logprobs(logits, 1)
    # float64: log((31 e^0) / (e^60 + 31)) ; a float32 log(1 - p_top) would give -inf
    exact = np.log(31.0) - np.logaddexp(60.0, np.log(31.0))
    assert abs(tail.item() - exact) < 1e-4 and np.isfinite(tail.item())
    assert np.float32(1.0) - np.exp(np.float32(logp.item())) == 0.0
    _ids, _lp, empty = kc_write.topk_logprobs(logits, 32)
    assert empty.item() == kc_format.FLOOR  # k = V: nothing left, stored finite


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0])
def test_retempering_matches_float64(world, tmp_path, target):
    capture = 2.0
    out = tmp_path / "c"
    kc_write.write_cache(
        app.load_spec(world["spec"]),
        out,
        top_k=16,
        dtype="float32",
        temperature=capture,
        shard_tokens=64 * SEQ,
        progress=False,
    )
    reader = kc_read.CacheReader(out / "teacher-0")
    index = np.arange(0, reader.num_rows, 5)
    signal = reader.signal(index)
    ids = np.array(signal.topk_ids)
    z = np.take_along_axis(world["logits"][index], ids, -1)
    # renormalize: softmax over the cached ids at the target temperature (exact for any T)
    _, renorm = signal.sparse_log_probs(target, "renormalize")
    np.testing.assert_allclose(np.array(renorm), log_softmax64(z / target), atol=2e-5)
    # tail-bucket: [top-k, tail] of the full distribution, exact at the capture temperature
    if target == capture:
        _, bucket = signal.sparse_log_probs(target, "tail-bucket")
        full = log_softmax64(world["logits"][index] / capture)
        outside = full.copy()
        np.put_along_axis(outside, ids, -np.inf, -1)
        tail = np.log(np.exp(outside).sum(-1))
        ref = np.concatenate([np.take_along_axis(full, ids, -1), tail[..., None]], -1)
        np.testing.assert_allclose(np.array(bucket), ref, atol=1e-4)
        assert np.allclose(np.exp(np.array(bucket)).sum(-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- hinton from the cache


def _hinton_inputs(signal: TeacherSignal, batch: dict, seed: int = 0) -> kdcore.LossInputs:
    from kdcore.models.output import ModelOutput

    B, L = batch["input_ids"].shape
    rng = np.random.default_rng(seed)
    student = mx.array(rng.standard_normal((B, L, signal.vocab_size)).astype(np.float32) * 3)
    return kdcore.LossInputs(
        student=ModelOutput(logits=student), teacher=signal, batch=to_mx(batch)
    )


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float16", 3e-3)])
def test_hinton_from_a_full_cache_equals_online_hinton(world, tmp_path, dtype, rtol):
    out = tmp_path / "c"
    spec = app.load_spec(world["spec"])
    kc_write.write_cache(spec, out, top_k=256, dtype=dtype, shard_tokens=64 * SEQ, progress=False)
    cached = open_cache(world["spec"], out)
    online = (
        get_registry()
        .get("teacher_source", "model")
        .factory(
            app.make_config("teacher_source", "model"),
            Setup(teacher=TeacherRef(path=str(world["teacher"]))),
        )
    )
    dataset = build_dataset(spec)
    for tail in ("renormalize", "tail-bucket"):
        params = app.make_config("loss", "hinton", temperature=2.0, tail=tail)
        loss = testing.build_loss("hinton", temperature=2.0, tail=tail)
        for index in range(3):
            batch = dataset.batch(index, 6)
            dense = online.signal(to_mx(batch))
            sparse = cached.signal(to_mx(batch))
            want, _ = loss(attrs.evolve(_hinton_inputs(dense, batch, index), params=params))
            got, _ = loss(attrs.evolve(_hinton_inputs(sparse, batch, index), params=params))
            assert want.item() > 0
            np.testing.assert_allclose(got.item(), want.item(), rtol=rtol)


def test_a_run_from_a_full_cache_follows_the_online_run(world, tmp_path):
    """Through the engine: rows are found by example_index under the shuffled order."""
    kc_write.write_cache(
        app.load_spec(world["spec"]),
        tmp_path / "c",
        top_k=256,
        dtype="float32",
        progress=False,
    )
    losses = [{"name": "hinton", "params": {"temperature": 2.0}}]
    curves = {}
    for name, teacher in (
        ("online", {"path": str(world["teacher"])}),
        ("cached", {"cache": str(tmp_path / "c")}),
    ):
        app.distill(
            app.load_spec(spec_dict([teacher], losses=losses)),
            output=tmp_path / name,
            progress=False,
        )
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        curves[name] = [json.loads(x)["loss/hinton"] for x in lines if "loss/hinton" in x]
    assert len(curves["online"]) == 3
    np.testing.assert_allclose(curves["cached"], curves["online"], rtol=1e-4)


# ---------------------------------------------------------------- resume


def test_a_full_disk_stops_the_write_clearly_and_a_rerun_finishes_it(world, tmp_path, monkeypatch):
    """ENOSPC at the second shard (MLX's writer comes up short): a clear error naming the
    shard, the first shard intact, and the same command, with space back, finishes the cache
    without rewriting it, to the bytes of a cache never interrupted."""
    spec = app.load_spec(world["spec"])
    out = tmp_path / "c"
    real = mx.save_safetensors

    def full_disk(path, arrays, metadata=None):
        if ".shard-00001." in str(path):
            raise RuntimeError("[write] Unable to write 8192 bytes to file.")
        return real(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors.*disk full"):
        kc_write.write_cache(spec, out, top_k=8, shard_tokens=40 * SEQ, progress=False)
    sub = out / "teacher-0"
    manifest = read_json(sub / "manifest.json")
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    assert not [p.name for p in sub.iterdir() if p.name.endswith(".tmp.safetensors")]
    monkeypatch.setattr(mx, "save_safetensors", real)
    written = []
    kc_write.write_cache(
        spec,
        out,
        top_k=8,
        shard_tokens=40 * SEQ,
        progress=False,
        on_shard=lambda t, s: written.append(s),
    )
    manifest = read_json(sub / "manifest.json")
    assert written == list(range(1, len(manifest["shards"])))
    reference = read_json(world["cache"] / "teacher-0" / "manifest.json")
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    kc_format.verify_cache(out)


def test_an_interrupted_write_resumes_where_it_stopped(world, tmp_path):
    spec = app.load_spec(world["spec"])
    out = tmp_path / "c"

    def interrupt(teacher, shard):
        raise RuntimeError("killed after shard 0")

    with pytest.raises(RuntimeError, match="killed"):
        kc_write.write_cache(
            spec, out, top_k=8, shard_tokens=40 * SEQ, on_shard=interrupt, progress=False
        )
    sub = out / "teacher-0"
    manifest = read_json(sub / "manifest.json")
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    assert manifest["complete"] is False
    with pytest.raises(CheckpointError, match="incomplete"):
        kc_read.CacheReader(sub)
    with pytest.raises(CheckpointError, match="incomplete"):
        kc_format.verify_cache(out)
    first = (sub / "shard-00000.safetensors").stat().st_mtime_ns

    written = []
    kc_write.write_cache(
        spec,
        out,
        top_k=8,
        shard_tokens=40 * SEQ,
        progress=False,
        on_shard=lambda t, s: written.append(s),
    )
    manifest = read_json(sub / "manifest.json")
    assert written == list(range(1, len(manifest["shards"])))
    assert manifest["complete"] and (sub / "shard-00000.safetensors").stat().st_mtime_ns == first
    # same bytes as a run that was never interrupted
    reference = read_json(world["cache"] / "teacher-0" / "manifest.json")
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert manifest["token_count"] == reference["token_count"] == 202 * SEQ
    kc_format.verify_cache(out)
    # a rerun with other settings refuses to mix them into this cache
    with pytest.raises(CheckpointError, match="different settings.*k"):
        kc_write.write_cache(spec, out, top_k=4, shard_tokens=40 * SEQ, progress=False)


# ---------------------------------------------------------------- corruption


def test_verify_passes_on_a_good_cache(world, capsys):
    assert kd_main(["cache", "--verify", str(world["cache"])]) == 0
    text = capsys.readouterr().out
    assert "teacher-0: ok, 6 shards, 3232 tokens" in text
    report = kc_format.verify_cache(world["cache"])
    bytes_per_token = report["teacher-0"]["bytes"] / report["teacher-0"]["tokens"]
    assert 8 * (2 + 4) + 4 <= bytes_per_token < 8 * (2 + 4) + 4 + 2  # + headers


def _bad(cache: Path, capsys, match: str, spec: dict) -> None:
    with pytest.raises(CheckpointError, match=match):
        kc_format.verify_cache(cache)
    assert kd_main(["cache", "--verify", str(cache)]) == 1
    assert re.search(match, capsys.readouterr().err)
    with pytest.raises(CheckpointError, match=match):
        open_cache(spec, cache)


def test_truncated_shard_is_named(world, cache_copy, capsys):
    shard = cache_copy / "teacher-0" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _bad(cache_copy, capsys, r"shard-00001\.safetensors is truncated", world["spec"])


def test_checksum_mismatch_is_named(world, cache_copy, capsys):
    shard = cache_copy / "teacher-0" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF
    shard.write_bytes(bytes(data))
    _bad(cache_copy, capsys, r"shard-00002\.safetensors does not match its sha256", world["spec"])


def test_missing_shard_is_named(world, cache_copy, capsys):
    (cache_copy / "teacher-0" / "shard-00000.safetensors").unlink()
    _bad(cache_copy, capsys, r"shard-00000\.safetensors is missing", world["spec"])


def test_shape_that_disagrees_with_the_manifest_is_named(world, cache_copy, capsys):
    path = cache_copy / "teacher-0" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][3]["rows"][1] -= 1  # the manifest claims one row fewer
    manifest["shards"][4]["rows"][0] -= 1
    path.write_text(json.dumps(manifest))
    _bad(
        cache_copy,
        capsys,
        r"shard-00003\.safetensors: topk_ids is int32 \(40, 16, 8\), "
        r"the manifest says int32 \(39, 16, 8\)",
        world["spec"],
    )


def test_manifest_that_is_not_json(world, cache_copy, capsys):
    (cache_copy / "teacher-0" / "manifest.json").write_text("{not json")
    _bad(cache_copy, capsys, r"teacher-0/manifest\.json is not valid JSON", world["spec"])


def test_manifest_with_a_damaged_entry(world, cache_copy, capsys):
    path = cache_copy / "teacher-0" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["shards"][1]["sha256"]
    path.write_text(json.dumps(manifest))
    _bad(
        cache_copy,
        capsys,
        r"manifest\.json is damaged: missing or malformed shards\[1\]",
        world["spec"],
    )


def test_a_gap_between_shards_is_named(world, cache_copy, capsys):
    path = cache_copy / "teacher-0" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["shards"][2]
    path.write_text(json.dumps(manifest))
    _bad(
        cache_copy,
        capsys,
        r"shard-00003\.safetensors: rows \[120, 160\) do not follow row 80",
        world["spec"],
    )


def test_data_fingerprint_mismatch_names_both(world, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(CORPUS.read_text(encoding="utf-8")[CHARS : 2 * CHARS], encoding="utf-8")
    spec = spec_dict([{"cache": str(world["cache"])}], data_path=other)
    expected = read_json(world["cache"] / "teacher-0" / "manifest.json")["data"]["fingerprint"]
    run_fp = build_dataset(app.load_spec(spec)).fingerprint()
    assert run_fp != expected
    with pytest.raises(CheckpointError, match=f"data fingerprint {run_fp}.*{expected}") as info:
        open_cache(spec, world["cache"])
    assert "tokenizer" not in str(info.value)  # same tokenizer: only the data is named


def test_tokenizer_mismatch_names_both(tmp_path):
    text = CORPUS.read_text(encoding="utf-8")[:CHARS]
    chars = sorted(set(text))
    folders = {}
    for extra in ("@", "#"):  # same ids for this text, different vocabularies
        assert extra not in text
        folders[extra] = tmp_path / f"tok{extra == '#'}"
        save_tokenizer(CharTokenizer(chars + [extra]), folders[extra])
    teacher = make_teacher(tmp_path / "teacher", CharTokenizer(chars + ["@"]))
    made = spec_dict([{"path": str(teacher)}], tokenizer=str(folders["@"]))
    kc_write.write_cache(app.load_spec(made), tmp_path / "c", top_k=4, progress=False)
    used = spec_dict([{"cache": str(tmp_path / "c")}], tokenizer=str(folders["#"]))
    manifest = read_json(tmp_path / "c" / "teacher-0" / "manifest.json")
    run_tok = app.fingerprint(CharTokenizer(chars + ["#"]))
    with pytest.raises(
        CheckpointError, match=f"tokenizer hash {run_tok}.*{manifest['data']['tokenizer_hash']}"
    ) as info:
        open_cache(used, tmp_path / "c")
    assert "fingerprint" not in str(info.value)  # the ids are equal: only the vocabulary differs
    open_cache(made, tmp_path / "c")  # the matching spec opens


def test_a_swapped_tokenizer_file_is_refused(world, cache_copy):
    save_tokenizer(CharTokenizer(list("abc")), cache_copy / "teacher-0")
    with pytest.raises(CheckpointError, match="tokenizer.json .* is not the tokenizer"):
        open_cache(world["spec"], cache_copy)


# ---------------------------------------------------------------- the command and the run


SPARSE_TEST = "sparse-test-ce"


class _Plugin:
    """A dense-only and a sparse-aware loss, registered in-process for these tests."""

    @staticmethod
    @kdcore.hookimpl
    def kd_losses():
        def sparse_ce(config, setup):
            def loss(inputs):
                ids, logp = inputs.teacher.sparse_log_probs(1.0, "renormalize")
                s = kdcore.log_softmax(inputs.student.logits)
                picked = mx.take_along_axis(s, ids, axis=-1)
                return kdcore.masked_mean(
                    -(mx.exp(logp) * picked).sum(-1), inputs.batch["mask"]
                ), {}

            return loss

        def dense_ce(config, setup):
            def loss(inputs):
                p = mx.exp(inputs.teacher.log_probs(1.0))
                s = kdcore.log_softmax(inputs.student.logits)
                return kdcore.masked_mean(-(p * s).sum(-1), inputs.batch["mask"]), {}

            return loss

        return [
            kdcore.Component(
                SPARSE_TEST,
                sparse_ce,
                requires={"teacher"},
                properties={"sparse_ok"},
                doc="test: CE to top-k",
            ),
            kdcore.Component(
                "dense-test-ce", dense_ce, requires={"teacher"}, doc="test: CE to dense"
            ),
        ]


@pytest.fixture
def test_losses():
    reset_registry(extra_plugins=[(_Plugin, "test-cache-losses")])
    yield
    reset_registry()


def test_kd_cache_command_writes_and_verifies(world, tmp_path, capsys):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(toml_dumps(world["spec"]))
    out = tmp_path / "c"
    assert (
        kd_main(
            [
                "cache",
                str(spec_path),
                "--output",
                str(out),
                "--top-k",
                "5",
                "--dtype",
                "bfloat16",
                "--temperature",
                "1.5",
            ]
        )
        == 0
    )
    manifest = read_json(out / "teacher-0" / "manifest.json")
    assert (manifest["k"], manifest["capture_temperature"]) == (5, 1.5)
    assert manifest["dtypes"] == {
        "topk_ids": "int32",
        "topk_logprobs": "bfloat16",
        "tail_logmass": "float32",
    }
    assert manifest["vocab_size"] == 256 and manifest["seq_len"] == SEQ
    assert manifest["teacher"]["identity"] == kc_write.teacher_identity(world["teacher"])
    assert manifest["tokenizer_hash"] == app.fingerprint(ByteTokenizer())
    assert (
        manifest["data"]["fingerprint"] == build_dataset(app.load_spec(world["spec"])).fingerprint()
    )
    assert manifest["token_count"] == 202 * SEQ and manifest["complete"]
    assert kd_main(["cache", "--verify", str(out)]) == 0
    assert kd_main(["cache"]) == 2


def test_validate_rejects_a_dense_loss_with_a_cache_teacher(world, tmp_path, capsys, test_losses):
    for loss, code in (("dense-test-ce", 2), (SPARSE_TEST, 0)):
        path = tmp_path / f"{loss}.toml"
        path.write_text(
            toml_dumps(spec_dict([{"cache": str(world["cache"])}], losses=[{"name": loss}]))
        )
        assert kd_main(["validate", str(path)]) == code
    err = capsys.readouterr().err
    assert "loss 'dense-test-ce' cannot work from a top-k cache" in err
    assert SPARSE_TEST not in err


def test_training_from_the_cache_never_loads_the_teacher(world, tmp_path):
    moved = tmp_path / "teacher-gone"
    shutil.copytree(world["teacher"], moved)
    spec = spec_dict([{"path": str(moved)}])
    # captured at the temperature hinton reads it at: a tail-bucket is exact only there
    kc_write.write_cache(
        app.load_spec(spec), tmp_path / "c", top_k=8, temperature=2.0, progress=False
    )
    shutil.rmtree(moved)  # the run below cannot load it even if it tried
    hinton = {"name": "hinton", "params": {"temperature": 2.0, "tail": "tail-bucket"}}
    run_spec = spec_dict([{"cache": str(tmp_path / "c")}], losses=[hinton, {"name": "ce"}])
    summary = app.distill(app.load_spec(run_spec), output=tmp_path / "run", progress=False)
    assert summary["steps"] == 3 and summary["final_losses"]["hinton"] > 0
    manifest = read_json(tmp_path / "c" / "teacher-0" / "manifest.json")
    assert summary["teacher_parameters"] == [manifest["teacher"]["num_parameters"]]


def test_a_teacher_that_needs_hidden_states_cannot_come_from_the_cache(world):
    teacher = open_cache(world["spec"], world["cache"])
    batch = to_mx(build_dataset(app.load_spec(world["spec"])).batch(0, 2))
    with pytest.raises(kdcore.SpecError, match="no hidden_states"):
        teacher.signal(batch, frozenset({"hidden_states"}))


def test_multi_teacher_cache_has_one_sub_cache_each(world, tmp_path):
    second = make_teacher(tmp_path / "t1", ByteTokenizer(), seed=1)
    spec = spec_dict([{"path": str(world["teacher"])}, {"path": str(second)}])
    out = tmp_path / "c"
    kc_write.write_cache(app.load_spec(spec), out, top_k=4, progress=False)
    assert [p.name for p in kc_format.teacher_dirs(out)] == ["teacher-0", "teacher-1"]
    report = kc_format.verify_cache(out)
    assert set(report) == {"teacher-0", "teacher-1"}
    with pytest.raises(kdcore.SpecError, match="holds 2 teacher caches"):
        open_cache(spec, out)
    batch = to_mx(build_dataset(app.load_spec(spec)).batch(1, 3))
    a = open_cache(spec, out, teacher=0).signal(batch)
    b = open_cache(spec, out / "teacher-1").signal(batch)
    ids = np.array(b.topk_ids)
    ref = log_softmax64(teacher_logits64(second, np.array(batch["input_ids"])))
    np.testing.assert_allclose(
        np.array(b.topk_logprobs.astype(mx.float32)),
        np.take_along_axis(ref, ids, -1),
        rtol=2.0**-10,
        atol=1e-5,
    )
    assert not np.array_equal(np.array(a.topk_ids), ids)


@pytest.mark.parametrize(
    "aggregator", [{"name": "mean"}, {"name": "weighted", "params": {"weights": [3.0, 1.0]}}]
)
def test_a_run_from_two_full_caches_follows_the_online_multi_teacher_run(
    world, tmp_path, aggregator
):
    """Several cached teachers under mean / weighted: the sparse mixture, exact at k = V."""
    second = make_teacher(tmp_path / "t1", ByteTokenizer(), seed=1)
    live = [{"path": str(world["teacher"])}, {"path": str(second)}]
    kc_write.write_cache(
        app.load_spec(spec_dict(live)),
        tmp_path / "c",
        top_k=256,
        dtype="float32",
        progress=False,
    )
    cached = [
        {"cache": str(tmp_path / "c" / "teacher-0")},
        {"cache": str(tmp_path / "c" / "teacher-1")},
    ]
    losses = [{"name": "hinton", "params": {"temperature": 2.0, "tail": "tail-bucket"}}]
    curves = {}
    for name, teachers in (("online", live), ("cached", cached)):
        spec = spec_dict(teachers, losses=losses)
        spec["aggregator"] = aggregator
        app.distill(app.load_spec(spec), output=tmp_path / name, progress=False)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        curves[name] = [json.loads(x)["loss/hinton"] for x in lines if "loss/hinton" in x]
    assert len(curves["online"]) == 3
    np.testing.assert_allclose(curves["cached"], curves["online"], rtol=1e-4)


def test_a_run_from_two_top_k_caches_trains(world, tmp_path):
    second = make_teacher(tmp_path / "t1", ByteTokenizer(), seed=1)
    live = [{"path": str(world["teacher"])}, {"path": str(second)}]
    kc_write.write_cache(app.load_spec(spec_dict(live)), tmp_path / "c", top_k=8, progress=False)
    spec = spec_dict(
        [{"cache": str(tmp_path / "c"), "params": {"teacher": i}} for i in range(2)],
        losses=[{"name": "hinton", "params": {"temperature": 1.0}}],
    )
    spec["train"]["steps"] = 12
    app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [x["loss/hinton"] for x in lines if "loss/hinton" in x]
    assert all(np.isfinite(values)) and values[-1] < values[0]


# ---------------------------------------------------------------- untrusted caches (issue 20)


@pytest.mark.parametrize("escape", ["../../outside.safetensors", "ABSOLUTE"])
def test_a_shard_path_that_leaves_the_cache_is_refused(world, cache_copy, capsys, escape):
    """A manifest is data: a shard named outside its folder is never opened, even when the
    file there is a perfectly good shard (here: the real one, moved out)."""
    sub = cache_copy / "teacher-0"
    outside = cache_copy.parent / "outside.safetensors"
    (sub / "shard-00000.safetensors").rename(outside)
    manifest = json.loads((sub / "manifest.json").read_text())
    manifest["shards"][0]["file"] = str(outside) if escape == "ABSOLUTE" else escape
    (sub / "manifest.json").write_text(json.dumps(manifest))
    _bad(cache_copy, capsys, r"shards\[0\].*outside the cache folder", world["spec"])


def test_a_teacher_folder_that_leaves_the_cache_set_is_refused(world, cache_copy, capsys):
    elsewhere = cache_copy.parent / "elsewhere"
    (cache_copy / "teacher-0").rename(elsewhere)
    path = cache_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["teachers"][0]["dir"] = "../elsewhere"
    path.write_text(json.dumps(manifest))
    _bad(cache_copy, capsys, r"teachers\[0\].*outside the cache folder", world["spec"])


def _rewrite_header(shard: Path, edit) -> None:
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def test_a_negative_shape_in_a_shard_header_is_refused(world, cache_copy, capsys):
    shard = cache_copy / "teacher-0" / "shard-00001.safetensors"

    def negate(header):  # two negative dimensions: the byte count still adds up
        rows, length, k = header["topk_ids"]["shape"]
        header["topk_ids"]["shape"] = [-rows, length, -k]

    _rewrite_header(shard, negate)
    _bad(cache_copy, capsys, r"shard-00001\.safetensors.*'topk_ids'.*shape", world["spec"])


def test_data_offsets_that_run_backwards_are_refused(world, cache_copy, capsys):
    shard = cache_copy / "teacher-0" / "shard-00001.safetensors"

    def backwards(header):
        begin, end = header["tail_logmass"]["data_offsets"]
        header["tail_logmass"]["data_offsets"] = [end, begin]

    _rewrite_header(shard, backwards)
    _bad(cache_copy, capsys, r"shard-00001\.safetensors.*'tail_logmass'", world["spec"])


def test_a_cache_set_with_no_teachers_is_refused(world, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(
        json.dumps({"format": kc_format.SET_FORMAT, "version": 1, "teachers": []})
    )
    _bad(empty, capsys, r"holds no teacher caches", world["spec"])


@pytest.mark.parametrize(
    "option, value",
    [
        ("--batch-size", "0"),
        ("--batch-size", "-3"),
        ("--shard-tokens", "0"),
        ("--temperature", "inf"),
        ("--temperature", "nan"),
    ],
)
def test_kd_cache_refuses_options_out_of_range(world, tmp_path, capsys, option, value):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(toml_dumps(world["spec"]))
    out = tmp_path / "c"
    code = kd_main(["cache", str(spec_path), "--output", str(out), option, value])
    assert code == 2
    assert option in capsys.readouterr().err
    assert not out.exists()  # refused before anything is written


# ---------------------------------------------------------------- kd eval of a cached run


def test_kd_eval_of_a_cached_run_has_teacher_figures_when_its_folder_is_known(world, tmp_path):
    """The manifest records the teacher's folder; kd eval loads it when its config and weights
    still hash to the manifest's identity, and says why not when they do not."""
    from kdcore.analysis.evaluate_run import evaluate_run

    losses = [{"name": "ce"}, {"name": "hinton"}]
    run = tmp_path / "run"
    spec = spec_dict([{"cache": str(world["cache"])}], losses=losses)
    app.distill(app.load_spec(spec), output=run, progress=False)
    cached = evaluate_run(run)
    online_spec = spec_dict([{"path": str(world["teacher"])}], losses=losses)
    online = tmp_path / "online"
    app.distill(app.load_spec(online_spec), output=online, progress=False)
    reference = evaluate_run(online)
    assert cached["teacher"] == str(world["teacher"])
    # the same teacher as the online run's (the students differ: k = 8 against all logits)
    assert cached["teacher_val_loss"] == pytest.approx(reference["teacher_val_loss"], rel=1e-5)
    assert cached["teacher_parameters"] == reference["teacher_parameters"]
    assert {"kl_teacher_student", "top1_agreement", "speedup"} <= set(cached)

    # the folder moved: the spec's teacher_path (here: from-teacher's) is tried, checked
    moved = tmp_path / "moved-teacher"
    shutil.copytree(world["teacher"], moved)
    manifest_dir = tmp_path / "cache"
    shutil.copytree(world["cache"], manifest_dir)
    manifest = read_json(manifest_dir / "teacher-0" / "manifest.json")
    manifest["teacher"]["path"] = str(tmp_path / "gone")
    (manifest_dir / "teacher-0" / "manifest.json").write_text(json.dumps(manifest))
    spec = spec_dict([{"cache": str(manifest_dir)}], losses=losses)
    (run / "spec.toml").write_text(toml_dumps(spec))
    report = evaluate_run(run)
    assert "teacher_val_loss" not in report
    assert "gone" in report["teacher"] and "not at" in report["teacher"]
    # a folder named in the spec but holding another model is not taken for the teacher
    other = make_teacher(tmp_path / "other", ByteTokenizer(), seed=5)
    spec["student"]["init"] = {"name": "from-teacher", "params": {"teacher_path": str(other)}}
    (run / "spec.toml").write_text(toml_dumps(spec))
    assert "teacher_val_loss" not in evaluate_run(run)
    spec["student"]["init"]["params"]["teacher_path"] = str(moved)
    (run / "spec.toml").write_text(toml_dumps(spec))
    found = evaluate_run(run)
    assert found["teacher"] == str(moved)
    assert found["teacher_val_loss"] == pytest.approx(reference["teacher_val_loss"], rel=1e-4)
