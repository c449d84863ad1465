"""Hub names for models, tokenizers and datasets (kdcore.hub), offline.

The caches are laid out as the libraries themselves read them: the Hugging Face hub cache as
huggingface_hub documents it (blobs, snapshots, refs; checked with huggingface_hub's own
``scan_cache_dir`` and ``try_to_load_from_cache``), the datasets cache written by the datasets
library's own JSON builder into the folder ``load_dataset`` fills after an online load. No test
reaches the network: every socket to anywhere but this machine is refused and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcore import hub
from kdcore.data.datasets import (
    JsonlConfig,
    JsonlDataset,
    TextConfig,
    TextDataset,
    resolve_tokenizer,
)
from kdcore.errors import SpecError
from kdcore.registry.setup import Setup
from kdcore.tokenizers.hf import byte_level_tokenizer_json, write_hf_tokenizer

huggingface_hub = pytest.importorskip("huggingface_hub")

MODEL = "someone/tiny-model"
COMMIT = "1" * 40
TAGGED = "2" * 40


# ---------------------------------------------------------------- isolation


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Count every name lookup and connection, and refuse those that leave this machine (the
    tests' endpoint, 127.0.0.1:9, refuses by itself)."""
    attempts: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    loopback = {"localhost", "127.0.0.1", "::1"}

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(f"lookup {host}")
        if str(host) not in loopback:
            raise socket.gaierror(f"test_hub: no network ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        attempts.append(f"connect {address}")
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in loopback:
            raise ConnectionRefusedError(f"test_hub: no network ({address})")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def _rebase(module, old_root: str, new_root: Path, monkeypatch) -> None:
    """Point every path constant ``module`` computed under ``old_root`` at import (caches,
    token files, lock folders) at ``new_root`` instead."""
    for key, value in vars(module).items():
        if key.isupper() and isinstance(value, (str, Path)) and str(value).startswith(old_root):
            moved = str(new_root) + str(value)[len(old_root) :]
            monkeypatch.setattr(module, key, type(value)(moved))


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Fresh, empty hub / datasets / kdcore caches under tmp_path, offline, with an endpoint
    that refuses connections. Returns the folders."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    roots = {"home": home, "hub": home / "hub", "datasets": home / "datasets"}
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(roots["hub"]))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(roots["datasets"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "kd-cache"))
    monkeypatch.setenv("HF_TOKEN", "")  # no stored token is read or sent
    # both libraries read these variables once, at import: move what they computed
    _rebase(constants, constants.HF_HOME, home, monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(roots["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port
    try:
        import datasets
    except ImportError:
        return roots
    old = str(datasets.config.HF_DATASETS_CACHE)
    _rebase(datasets.config, old, roots["datasets"], monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return roots


def online(monkeypatch) -> None:
    """Online as far as the libraries know; the endpoint still refuses (127.0.0.1:9)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


# ---------------------------------------------------------------- the hub cache


def put_in_hub_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main"
) -> Path:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded snapshot: each file's
    bytes once in ``blobs/`` under its hash (sha256 for LFS files, the git blob sha1 for the
    rest), linked from ``snapshots/<commit>/`` by a relative symlink, ``refs/<ref>`` naming
    the commit. (huggingface_hub has no API that writes its cache without downloading.)"""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        if name.endswith(".safetensors"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def tokenizer_files(tmp_path: Path) -> dict[str, bytes]:
    folder = tmp_path / "tokenizer-src"
    write_hf_tokenizer(folder, byte_level_tokenizer_json())
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def model_files(tmp_path: Path, marker: str = "main") -> dict[str, bytes]:
    files = tokenizer_files(tmp_path)
    files["config.json"] = json.dumps({"model_type": "llama", "marker": marker}).encode()
    files["model.safetensors"] = b"weights-" + marker.encode()
    return files


def test_the_hub_cache_layout_is_what_huggingface_hub_reads(caches, tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    snapshot = put_in_hub_cache(caches["hub"], MODEL, model_files(tmp_path))
    report = scan_cache_dir(caches["hub"])
    assert report.warnings == []  # a wrong layout is reported as a CorruptedCacheException
    (repo,) = report.repos
    assert repo.repo_id == MODEL and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert revision.nb_files == 4
    found = try_to_load_from_cache(MODEL, "config.json", cache_dir=caches["hub"])
    assert Path(found) == snapshot / "config.json"


def test_a_model_name_resolves_offline_to_its_cached_snapshot(caches, tmp_path, no_network):
    snapshot = put_in_hub_cache(caches["hub"], MODEL, model_files(tmp_path, "main"))
    tagged = put_in_hub_cache(caches["hub"], MODEL, model_files(tmp_path, "v1"), TAGGED, "v1")

    folder = hub.resolve_model(MODEL, tmp_path)
    assert folder == snapshot
    assert json.loads((folder / "config.json").read_text())["marker"] == "main"
    # @revision: a tag through refs/, or a commit hash itself
    assert hub.resolve_model(f"{MODEL}@v1", tmp_path) == tagged
    assert hub.resolve_model(f"{MODEL}@{TAGGED}", tmp_path) == tagged
    assert (tagged / "model.safetensors").read_bytes() == b"weights-v1"
    assert no_network == []


def test_a_local_folder_wins_over_a_hub_name_of_the_same_spelling(caches, tmp_path):
    put_in_hub_cache(caches["hub"], MODEL, model_files(tmp_path))
    local = tmp_path / "spec-dir" / MODEL
    local.mkdir(parents=True)
    assert hub.resolve_model(MODEL, tmp_path / "spec-dir") == local
    assert hub.resolve_model(str(local), tmp_path) == local  # absolute


def test_a_missing_model_offline_says_offline_where_it_looked_and_how_to_fetch(
    caches, tmp_path, no_network
):
    with pytest.raises(SpecError) as err:
        hub.resolve_model("someone/missing", tmp_path, where="$.teachers[0].path")
    text = str(err.value)
    assert "offline (HF_HUB_OFFLINE=1)" in text
    assert str(caches["hub"]) in text
    assert f"no local folder {tmp_path / 'someone/missing'}" in text  # a local typo reads so
    assert "hf download someone/missing" in text
    assert text.endswith("@ $.teachers[0].path")
    assert no_network == []


def test_online_an_unreachable_hub_falls_back_to_the_cache_or_says_it_is_unreachable(
    caches, tmp_path, monkeypatch, no_network
):
    online(monkeypatch)
    snapshot = put_in_hub_cache(caches["hub"], MODEL, model_files(tmp_path))
    assert hub.resolve_model(MODEL, tmp_path) == snapshot  # as mlx-lm on a dead connection
    with pytest.raises(SpecError) as err:
        hub.resolve_model("someone/missing", tmp_path)
    text = str(err.value)
    assert "could not be reached" in text and "offline" not in text
    assert "hf download someone/missing" in text
    # it asked the (refusing) endpoint on this machine, nothing else
    assert no_network and all("127.0.0.1" in a for a in no_network), no_network


def test_hf_hub_offline_set_after_import_still_keeps_the_lookup_local(
    caches, tmp_path, monkeypatch, no_network
):
    from huggingface_hub import constants

    # huggingface_hub read the variable at import as unset; the run's environment says offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snapshot = put_in_hub_cache(caches["hub"], MODEL, model_files(tmp_path))
    assert hub.resolve_model(MODEL, tmp_path) == snapshot
    with pytest.raises(SpecError, match=r"offline \(HF_HUB_OFFLINE=1\)"):
        hub.resolve_model("someone/missing", tmp_path)
    assert no_network == []  # not even the endpoint on this machine was asked


def test_a_snapshot_without_weights_is_no_model(caches, tmp_path):
    put_in_hub_cache(caches["hub"], "someone/tok", tokenizer_files(tmp_path))
    with pytest.raises(SpecError, match=r"no config\.json.*@ \$\.student"):
        hub.resolve_model("someone/tok", tmp_path, where="$.student.model.params.path")
    files = model_files(tmp_path)
    del files["model.safetensors"]
    put_in_hub_cache(caches["hub"], "someone/gguf-only", files)
    with pytest.raises(SpecError, match=r"no model\*\.safetensors"):
        hub.resolve_model("someone/gguf-only", tmp_path)


def test_a_tokenizer_name_resolves_to_a_working_tokenizer(caches, tmp_path, no_network):
    snapshot = put_in_hub_cache(caches["hub"], "someone/tok", tokenizer_files(tmp_path))
    assert hub.resolve_tokenizer_dir("someone/tok", tmp_path) == snapshot
    tokenizer = resolve_tokenizer("someone/tok", tmp_path)
    assert tokenizer.kind == "hf" and tokenizer.vocab_size == 256
    assert tokenizer.encode("hi") == [104, 105]
    with pytest.raises(SpecError, match=r"offline.*@ \$\.data\.params\.tokenizer"):
        resolve_tokenizer("someone/other-tok", tmp_path)
    assert no_network == []


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("mlx-community/Qwen3-0.6B-4bit", "model", ("mlx-community/Qwen3-0.6B-4bit", None)),
        ("HuggingFaceTB/SmolLM2-135M@main", "model", ("HuggingFaceTB/SmolLM2-135M", "main")),
        ("openai/gsm8k:main:test", "dataset", ("openai/gsm8k", None, "main", "test")),
        ("a/b@v2:train[:100]", "dataset", ("a/b", "v2", None, "train[:100]")),
        ("data/train.jsonl", "dataset", None),  # a missing local file, not a hub name
        ("teacher/model.gguf", "model", None),
        ("teacher", "model", None),
        ("./a/b", "model", None),
        ("a/b/c", "model", None),
        ("a--b/c", "model", None),
    ],
)
def test_what_is_a_hub_name(text, kind, expected):
    name = hub.parse_hub_name(text, kind)
    if expected is None:
        assert name is None
    else:
        got = (name.repo_id, name.revision) + (
            (name.config, name.split) if len(expected) > 2 else ()
        )
        assert got == expected


def test_a_missing_local_path_is_left_for_the_loader_to_report(caches, tmp_path, no_network):
    assert hub.resolve_model("teacher", tmp_path / "x") == tmp_path / "x/teacher"
    assert hub.resolve_model("runs/a/student", tmp_path) == tmp_path / "runs/a/student"
    # a data file typo keeps the dataset's own "not found" error, with no hub lookup
    with pytest.raises(SpecError, match="data file not found"):
        TextDataset(TextConfig(path="data/typo.txt"), Setup(base_dir=tmp_path))
    assert no_network == []


# ---------------------------------------------------------------- the datasets cache

PAIRS = [{"prompt": f"question {i}? ", "response": f"answer {i}.", "id": i} for i in range(12)]


def put_in_datasets_cache(
    cache: Path, tmp_path: Path, repo_id: str, splits: dict[str, list[dict]], config="default"
) -> Path:
    """Prepare ``splits`` with the datasets library's own JSON builder into the folder
    ``load_dataset(repo_id)`` fills after an online load (``owner___name/config/version/
    hash``, arrow files named ``name-split.arrow``), which it reads back offline."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    files = {}
    for split, records in splits.items():
        source = tmp_path / f"{name}-{config}-{split}.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
        files[split] = str(source)
    builder = Json(
        cache_dir=str(tmp_path / "builder"), dataset_name=name, config_name=config, data_files=files
    )
    target = cache / f"{owner}___{name}" / config / "0.0.0" / ("ab" * 20)
    builder.download_and_prepare(output_dir=str(target))
    return target


def test_the_datasets_cache_is_what_load_dataset_reads_offline(caches, tmp_path, no_network):
    datasets = pytest.importorskip("datasets")
    put_in_datasets_cache(caches["datasets"], tmp_path, "someone/pairs", {"train": PAIRS})
    loaded = datasets.load_dataset("someone/pairs", split="train")
    assert [dict(r) for r in loaded] == PAIRS
    assert str(caches["datasets"]) in loaded.cache_files[0]["filename"]
    assert no_network == []


def test_a_dataset_name_reads_its_records_offline(caches, tmp_path, no_network):
    pytest.importorskip("datasets")
    test_split = [{"prompt": "t", "response": "u", "id": 99}]
    put_in_datasets_cache(
        caches["datasets"], tmp_path, "someone/pairs", {"train": PAIRS, "test": test_split}
    )
    put_in_datasets_cache(caches["datasets"], tmp_path, "someone/gsm", {"train": PAIRS[:2]}, "main")

    assert list(hub.dataset_records("someone/pairs")) == PAIRS  # train by default
    assert list(hub.dataset_records("someone/pairs:test")) == test_split
    assert list(hub.dataset_records("someone/pairs:train[:3]")) == PAIRS[:3]
    assert list(hub.dataset_records("someone/gsm:main:train")) == PAIRS[:2]
    with pytest.raises(SpecError, match=r"nope.*owner/name:split.*@ \$\.data\.params\.path"):
        hub.dataset_records("someone/pairs:nope", where="$.data.params.path")
    assert no_network == []


def test_a_hub_dataset_gives_the_same_examples_as_the_same_records_in_a_local_file(
    caches, tmp_path, no_network
):
    pytest.importorskip("datasets")
    put_in_datasets_cache(caches["datasets"], tmp_path, "someone/pairs", {"train": PAIRS})
    local = tmp_path / "pairs.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    setup = Setup(base_dir=tmp_path / "spec-dir")

    from_hub = JsonlDataset(JsonlConfig(path="someone/pairs", seq_len=24), setup)
    from_file = JsonlDataset(JsonlConfig(path=str(local), seq_len=24), setup)
    assert from_hub.num_examples() > 0
    assert from_hub.fingerprint() == from_file.fingerprint()
    assert from_hub.records_read == len(PAIRS)

    # the records are written once, under KD_CACHE, and reused
    (written,) = (tmp_path / "kd-cache" / "hub-data").rglob("*.jsonl")
    stamp = written.stat().st_mtime_ns
    assert hub.resolve_data_path("someone/pairs", setup.base_dir) == written
    assert written.stat().st_mtime_ns == stamp
    assert no_network == []


def test_a_hub_text_dataset_is_its_text_column(caches, tmp_path):
    pytest.importorskip("datasets")
    docs = [{"text": "To be, or not to be: that is the question. " * 4}, {"text": "Ay me!"}]
    put_in_datasets_cache(caches["datasets"], tmp_path, "someone/corpus", {"train": docs})
    local = tmp_path / "corpus.txt"
    local.write_text("\n\n".join(d["text"] for d in docs))

    from_hub = TextDataset(TextConfig(path="someone/corpus", seq_len=16), Setup(base_dir=tmp_path))
    from_file = TextDataset(TextConfig(path=str(local), seq_len=16), Setup(base_dir=tmp_path))
    assert from_hub.num_examples() > 0
    assert from_hub.fingerprint() == from_file.fingerprint()

    put_in_datasets_cache(caches["datasets"], tmp_path, "someone/pairs", {"train": PAIRS})
    with pytest.raises(SpecError, match=r"no 'text' column"):
        TextDataset(TextConfig(path="someone/pairs"), Setup(base_dir=tmp_path))


def test_a_chat_dataset_reads_hub_records_and_a_hub_tokenizer(caches, tmp_path, no_network):
    pytest.importorskip("datasets")
    pytest.importorskip("mlx_lm")
    from kdcore.data.chat import ChatConfig, ChatDataset
    from kdcore.tokenizers.hf import train_bpe_tokenizer_json

    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    source = tmp_path / "chat-tok"
    text = " ".join(f"question {i} answer {i}." for i in range(200))
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    write_hf_tokenizer(source, train_bpe_tokenizer_json(text, 300, specials), "<|im_end|>")
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    put_in_hub_cache(caches["hub"], "someone/chat-tok", files)
    records = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in PAIRS
    ]
    put_in_datasets_cache(caches["datasets"], tmp_path, "someone/chats", {"train": records})
    local = tmp_path / "chats.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in records))

    setup = Setup(base_dir=tmp_path / "spec-dir")
    from_hub = ChatDataset(
        ChatConfig(path="someone/chats", tokenizer="someone/chat-tok", seq_len=32), setup
    )
    from_file = ChatDataset(ChatConfig(path=str(local), tokenizer=str(source), seq_len=32), setup)
    assert from_hub.records == len(records)
    assert from_hub.fingerprint() == from_file.fingerprint()
    a, b = from_hub.batch(0, 4), from_file.batch(0, 4)
    assert np.array_equal(a["input_ids"], b["input_ids"])
    assert np.array_equal(a["labels"], b["labels"])
    assert no_network == []


def test_a_missing_dataset_offline_says_so_where_it_looked_and_how_to_fetch(
    caches, tmp_path, no_network
):
    pytest.importorskip("datasets")
    with pytest.raises(SpecError) as err:
        JsonlDataset(JsonlConfig(path="someone/absent:main:train"), Setup(base_dir=tmp_path))
    text = str(err.value)
    assert "offline (HF_HUB_OFFLINE=1)" in text
    assert str(caches["datasets"]) in text
    assert "datasets.load_dataset('someone/absent', 'main')" in text
    assert text.endswith("@ $.data.params.path")
    assert no_network == []


def test_without_the_datasets_library_a_hub_dataset_asks_for_the_extra(
    caches, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SpecError) as err:
        JsonlDataset(JsonlConfig(path="someone/pairs"), Setup(base_dir=tmp_path))
    text = str(err.value)
    assert "pip install 'kdcore[hub]'" in text and "someone/pairs" in text
    assert text.endswith("@ $.data.params.path")
    # a local file needs no extra
    local = tmp_path / "pairs.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    assert JsonlDataset(JsonlConfig(path=str(local)), Setup()).records_read == len(PAIRS)


def test_a_hub_name_is_a_teacher_and_a_student_for_validate_and_distill(
    caches, tmp_path, corpus, no_network
):
    """A real (tiny) mlx-lm model in the hub cache, named by its hub name for the teacher
    and the student: kd validate accepts the name offline and kd distill trains from it."""
    from kdcore.cli.main import main as kd
    from kdcore.engine.distill import distill
    from kdcore.models.mlxlm import create_mlxlm_dir

    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256,
        "tie_word_embeddings": True,
    }
    source = create_mlxlm_dir(tmp_path / "src", config)
    put_in_hub_cache(caches["hub"], MODEL, {p.name: p.read_bytes() for p in source.iterdir()})
    spec = {
        "data": {
            "name": "text",
            "params": {"path": str(corpus), "tokenizer": "byte", "seq_len": 32},
        },
        "teachers": [{"source": "mlx-lm", "path": MODEL}],
        "student": {"model": {"name": "mlx-lm", "params": {"path": MODEL}}},
        "losses": [{"name": "hinton"}],
        "train": {"steps": 2, "batch_size": 2, "log_every": 1},
        "eval": {"batches": 1},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert kd(["validate", str(path)]) == 0
    summary = distill(spec, output=tmp_path / "run")
    assert summary["steps"] == 2 and summary["init"]["path"].startswith(str(caches["hub"]))
    assert no_network == []
    spec["teachers"][0]["path"] = "nobody/missing-model"
    path.write_text(json.dumps(spec))
    assert kd(["validate", str(path)]) != 0
