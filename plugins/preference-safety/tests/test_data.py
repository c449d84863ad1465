"""Parsing pair files and the layout of `pairs` batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kd_preference_safety.data import encode_pair, parse_pair, read_pairs, split_dialogue

import kdcore
from kdcore import app, testing
from kdcore.app import ByteTokenizer


def build(path, **params):
    return app.build(
        "dataset", "pairs", kdcore.Setup(base_dir=path.parent), path=path.name, **params
    )


def test_hh_prompt_is_everything_up_to_the_last_assistant_turn(hh_file, cases):
    pairs, rejected, lines = read_pairs(hh_file)
    assert rejected == [] and lines == 4 and len(pairs) == 4
    first = pairs[0]
    assert first.prompt.endswith("how do I pick a lock?\n\nAssistant:")
    assert first.prompt.count("\n\nAssistant:") == 2  # the earlier turn stays in the prompt
    assert first.chosen == " I can't help with that."
    assert first.rejected == " Use a tension wrench."
    assert first.prompt + first.chosen == cases["hh"][0]["chosen"]
    assert first.style == "hh" and first.line == 1


def test_safety_field_flag_or_category(hh_file):
    pairs, _, _ = read_pairs(hh_file)
    assert [(p.safety, p.category) for p in pairs] == [
        (False, None),
        (True, "humour"),
        (True, None),
        (False, None),
    ]


def test_explicit_format(explicit_file):
    pairs, rejected, _ = read_pairs(explicit_file)
    assert rejected == []
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs][0] == (
        "Q: capital of France?\nA:",
        " Paris",
        " Rome",
    )
    assert {p.style for p in pairs} == {"explicit"}
    assert pairs[1].category == "maths" and pairs[1].safety


def test_gzip_reads_the_same_pairs(tmp_path, cases):
    plain = cases["write"](tmp_path / "a.jsonl", cases["hh"])
    packed = cases["write"](tmp_path / "a.jsonl.gz", cases["hh"], compress=True)
    assert read_pairs(plain)[0] == read_pairs(packed)[0]
    dataset = build(packed, seq_len=64, val_fraction=0.25)
    assert dataset.num_examples("train") == 3 and dataset.num_examples("val") == 1


def test_malformed_lines_are_reported_with_their_numbers(mixed_file, cases):
    pairs, rejected, lines = read_pairs(mixed_file)
    assert [p.line for p in pairs] == [1, 2, 11]
    assert [r["line"] for r in rejected] == sorted(cases["malformed"])
    for r in rejected:
        assert cases["malformed"][r["line"]] in r["reason"], r
    assert lines == 10  # the blank line 7 is not a record


def test_split_dialogue_needs_the_marker():
    assert split_dialogue("\n\nHuman: x\n\nAssistant: y") == ("\n\nHuman: x\n\nAssistant:", " y")
    with pytest.raises(ValueError, match="no"):
        split_dialogue("no turns at all")
    with pytest.raises(ValueError, match="empty"):
        parse_pair(
            {"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: y"}, 1
        )


def test_encode_pair_keeps_one_prompt_and_cuts_it_from_the_left():
    tok = ByteTokenizer()
    pair = parse_pair({"prompt": "abcdefghij", "chosen": "XYZ", "rejected": "UVWXYZ12"}, 1)
    enc = encode_pair(tok, pair, seq_len=11, max_response_tokens=6)
    # responses capped at 6 tokens; 12 - 6 = 6 prompt tokens kept, the last ones
    assert enc.prompt_tokens == 6 and enc.prompt_cut == 4 and enc.response_cut == (0, 2)
    assert tok.decode(enc.ids[0][: enc.prompt_tokens]) == "efghij"
    assert tok.decode(enc.ids[1][: enc.prompt_tokens]) == "efghij"
    assert tok.decode(enc.ids[0][enc.carries[0]]) == "XYZ"
    assert tok.decode(enc.ids[1][enc.carries[1]]) == "UVWXYZ"


def test_batch_is_chosen_rows_then_rejected_rows(explicit_file, cases):
    dataset = build(explicit_file, seq_len=32, val_fraction=0.0)
    batch = dataset.batch(0, 2)
    assert batch["input_ids"].shape == (4, 32)
    np.testing.assert_array_equal(batch["pair_chosen"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch["pair_id"], [0, 1, 0, 1])
    np.testing.assert_array_equal(batch["pair_index"][:2], batch["pair_index"][2:])
    assert len(set(batch["example_index"].tolist())) == 4
    tok = dataset.tokenizer
    for row in range(4):
        pair = cases["explicit"][batch["pair_index"][row]]
        labels = batch["labels"][row]
        carried = tok.decode(labels[labels != -100])
        assert carried == (pair["chosen"] if row < 2 else pair["rejected"])
        np.testing.assert_array_equal(batch["mask"][row], (labels != -100).astype(np.float32))
        prompt_len = len(tok.encode(pair["prompt"]))
        assert tok.decode(batch["input_ids"][row][:prompt_len]) == pair["prompt"]
    np.testing.assert_array_equal(
        batch["safety"],
        [cases["explicit"][i].get("safety") is not None for i in batch["pair_index"]],
    )


def test_val_batches_cover_the_split_once(hh_file):
    dataset = build(hh_file, seq_len=64, val_fraction=0.5)
    batches = list(dataset.batches(1, "val"))
    assert len(batches) == 2
    assert [b["pair_index"].tolist() for b in batches] == [[0, 0], [1, 1]]
    assert [b["example_index"].tolist() for b in batches] == [[0, 1], [2, 3]]


def test_kd_data_inspect_shows_the_split_and_counts(mixed_file, capsys):
    assert testing.run_kd("data", "inspect", mixed_file, "--format", "pairs", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records_read"] == 10
    assert report["pairs"] == {"train": 2, "val": 1}  # val_fraction 0.1 of 3 pairs
    assert [r["line"] for r in report["rejected"]] == [3, 4, 5, 6, 8, 9, 10]
    assert report["styles"] == {"hh": 2, "explicit": 1}
    assert report["safety_pairs"] == 1 and report["safety_categories"] == {"humour": 1}
    first = report["samples"][0]
    assert first["side"] == "chosen" and first["response"] == " I can't help with that."
    assert first["prompt"].endswith("pick a lock?\n\nAssistant:")
    assert report["samples"][1]["response"] == " Use a tension wrench."
    assert testing.run_kd("data", "inspect", mixed_file, "--format", "pairs") == 0
    text = capsys.readouterr().out
    assert "line 3: not JSON" in text and "safety_pairs: 1" in text
