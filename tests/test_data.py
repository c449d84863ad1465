"""Datasets: deterministic batches, splits, response-only masks, rejected lines."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from kdcore.data.datasets import JsonlConfig, JsonlDataset, TextConfig, TextDataset
from kdcore.losses.tokens import IGNORE_INDEX
from kdcore.registry.setup import Setup
from kdcore.tokenizers.simple import ByteTokenizer, CharTokenizer, fingerprint


def test_text_batches_are_a_function_of_seed_and_index(corpus):
    a = TextDataset(TextConfig(path=str(corpus), seq_len=16), Setup(seed=1))
    b = TextDataset(TextConfig(path=str(corpus), seq_len=16), Setup(seed=1))
    c = TextDataset(TextConfig(path=str(corpus), seq_len=16), Setup(seed=2))
    for index in (0, 5, 10_000):
        for key in ("input_ids", "labels", "example_index"):
            assert np.array_equal(a.batch(index, 4)[key], b.batch(index, 4)[key])
    assert not np.array_equal(a.batch(0, 4)["input_ids"], c.batch(0, 4)["input_ids"])


def test_text_labels_are_next_tokens_and_val_is_the_tail(corpus):
    ds = TextDataset(TextConfig(path=str(corpus), seq_len=16, val_fraction=0.2), Setup())
    batch = ds.batch(0, 2)
    assert np.array_equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    text = corpus.read_text()
    tail = ds.tokenizer.decode(next(ds.batches(1, "val"))["input_ids"][0])
    assert tail in text[int(len(text.encode()) * 0.8) - 20 :]


def test_an_epoch_visits_every_example_once(corpus):
    ds = TextDataset(TextConfig(path=str(corpus), seq_len=64), Setup(seed=3))
    n = ds.num_examples("train")
    seen = np.concatenate([ds.batch(i, 1)["example_index"] for i in range(n)])
    assert sorted(seen.tolist()) == list(range(n))


def test_char_tokenizer_round_trips_and_fingerprints_differ():
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.encode("z") == [0]  # unknown character
    assert fingerprint(tok) != fingerprint(ByteTokenizer())
    assert fingerprint(CharTokenizer.from_text("abc")) == fingerprint(
        CharTokenizer.from_text("cba")
    )


def test_jsonl_masks_cover_responses_only(tmp_path):
    path = tmp_path / "pr.jsonl.gz"
    lines = [
        json.dumps({"prompt": "Q: 2+2? ", "response": "A: 4"}),
        "not json at all",
        json.dumps({"prompt": "Q: 1+1? "}),
        json.dumps({"prompt": "Q: 3+3? ", "response": "A: 6"}),
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    ds = JsonlDataset(JsonlConfig(path=str(path), seq_len=24, val_fraction=0.0), Setup())
    assert ds.records_read == 4
    assert [r["line"] for r in ds.rejected] == [2, 3]
    assert "JSON" in ds.rejected[0]["reason"] and "response" in ds.rejected[1]["reason"]
    batch = next(ds.batches(8, "train"))
    carried = [ds.tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert carried == ["A: 4", "A: 6"]
    assert np.array_equal(batch["mask"] > 0, batch["labels"] != IGNORE_INDEX)


def test_missing_data_file_is_named(tmp_path):
    from kdcore.errors import SpecError

    with pytest.raises(SpecError, match="nope.txt"):
        TextDataset(TextConfig(path=str(tmp_path / "nope.txt")), Setup())
