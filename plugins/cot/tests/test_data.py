"""Readers, templates and masks of the rationale dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kd_cot.dataset import RationaleDataset
from kd_cot.records import parse_gsm8k, read_records, strip_annotations
from kd_cot.templates import NAMED, TemplateError, get_template

from kdcore import IGNORE_INDEX, Dataset, Setup
from kdcore.app import ByteTokenizer, make_config

GSM8K_SLICE = Path(__file__).parent / "data" / "gsm8k_slice.jsonl"  # 300 GSM8K train records
GSM8K_FULL = Path("/work/shared/data/gsm8k_train.jsonl")  # 7,473 records, where present


def build(path: Path, name: str = "rationale", **params) -> RationaleDataset:
    config = make_config("dataset", name, path=str(path), **params)
    return RationaleDataset(config, Setup(base_dir=path.parent))


def decode_answer(ds, split: str, row: int) -> str:
    arrays = ds._examples[split]
    picked = arrays["labels"][row][arrays["answer_mask"][row] > 0]
    return ds.tokenizer.decode(picked.tolist())


def _gsm8k_full_file_check(path: Path) -> None:
    lines = sum(1 for line in open(path, encoding="utf-8") if line.strip())
    ds = build(path, "gsm8k", val_fraction=0.0)
    assert ds.records_read == lines
    assert ds.rejected == []
    assert len(ds.records) == lines
    checks = ds.answer_checks()
    assert len(checks) == lines
    bad = [c for c in checks if not c["ok"]]
    assert bad == [], bad[:3]
    # the records' answers are the '####' lines of the file, in order
    answers = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in open(path)]
    assert [r.answer for r in ds.records] == answers


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(GSM8K_SLICE, id="bundled-slice"),
        pytest.param(
            GSM8K_FULL,
            id="full-train-file",
            marks=pytest.mark.skipif(
                not GSM8K_FULL.exists(), reason="the full GSM8K train file is not on this machine"
            ),
        ),
    ],
)
def test_gsm8k_every_record_parses_and_masks_its_answer(path):
    """The bundled 300-record slice, and the full train file (7,473 records) where present."""
    _gsm8k_full_file_check(path)


def test_gsm8k_slice_with_every_named_template():
    for name, template in NAMED.items():
        if name == "program":
            continue
        ds = build(GSM8K_SLICE, "gsm8k", templates=[name], val_fraction=0.0)
        assert len(ds.records) == 300 and not ds.rejected
        if template.has_answer:
            assert all(c["ok"] for c in ds.answer_checks()), name
        arrays = ds._examples["train"]
        # reasoning and answer masks split the loss mask exactly
        np.testing.assert_array_equal(
            arrays["reasoning_mask"] + arrays["answer_mask"], arrays["mask"]
        )
        assert ((arrays["labels"] != IGNORE_INDEX) == (arrays["mask"] > 0)).all()


def test_masks_and_prompt_on_a_custom_template(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"question": "2+3", "rationale": ["2+3+0=5"], "answer": "5"}) + "\n")
    ds = build(path, templates=["Q:{question}\n{rationale}\nA:{answer}\n"], val_fraction=0.0)
    arrays = ds._examples["train"]
    tok = ByteTokenizer()
    text = "Q:2+3\n2+3+0=5\nA:5\n"
    assert tok.decode(arrays["input_ids"][0][: len(text)]) == text
    loss = tok.decode(arrays["labels"][0][arrays["mask"][0] > 0].tolist())
    assert loss == "2+3+0=5\nA:5\n"  # the prompt "Q:2+3\n" carries no loss
    assert (
        tok.decode(arrays["labels"][0][arrays["reasoning_mask"][0] > 0].tolist()) == "2+3+0=5\nA:\n"
    )
    assert decode_answer(ds, "train", 0) == "5"
    # labels are the next tokens of the text wherever they carry loss
    full = np.array(tok.encode(text))
    carry = arrays["mask"][0][: len(text) - 1] > 0
    np.testing.assert_array_equal(arrays["labels"][0][: len(text) - 1][carry], full[1:][carry])


def test_annotations_kept_or_stripped():
    record = {"question": "q", "answer": "48/2 = <<48/2=24>>24 clips.\n#### 24"}
    kept = parse_gsm8k(record, 1, "keep")
    stripped = parse_gsm8k(record, 1, "strip")
    assert kept.steps[0].text == "48/2 = <<48/2=24>>24 clips."
    assert stripped.steps[0].text == "48/2 = 24 clips."
    assert strip_annotations("a <<1+1=2>>2 b <<2*2=4>>4") == "a 2 b 4"
    ds = build(GSM8K_SLICE, "gsm8k", annotations="strip", max_records=20)
    assert all("<<" not in r.rationale for r in ds.records)
    assert all(c["ok"] for c in ds.answer_checks())


def test_bad_records_are_reported_with_their_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        {"question": "fine", "answer": "step\n#### 3"},
        {"question": "no answer line", "answer": "step only"},
        "not json at all",
        {"question": "", "answer": "x\n#### 1"},
        {"question": "unbalanced", "answer": "a <<1+1=2 b\n#### 2"},
        {"question": "empty answer", "answer": "a\n#### "},
        {"question": "fine too", "answer": "a\nb\n#### 1,000"},
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    records, rejected, read = read_records(path, "gsm8k")
    assert read == 7
    assert [r.line for r in records] == [1, 7]
    assert records[1].answer == "1,000"
    assert [r["line"] for r in rejected] == [2, 3, 4, 5, 6]
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert "####" in reasons[2] and "JSON" in reasons[3] and "empty" in reasons[4]
    assert "unbalanced" in reasons[5] and "empty answer" in reasons[6]


def test_generic_records_and_program_of_thought(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"question": "a", "rationale": "x = 1\ny = 2", "answer": "3"},
        {"question": "b", "rationale": ["one", "two"], "answer": 4},
        {"question": "c", "program": "(48 / 2) + 48", "answer": "72"},
        {"question": "d", "program": "48 + 1", "answer": "72"},  # wrong program
        {"question": "e", "program": "__import__('os')", "answer": "0"},  # not arithmetic
        {"question": "f", "rationale": 5, "answer": "1"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, rejected, _ = read_records(path)
    assert [r.kind for r in records] == ["cot", "cot", "pot"]
    assert records[1].answer == "4" and len(records[1].steps) == 2
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert "evaluates to 49" in reasons[4]
    assert "rejected" in reasons[5]
    assert "rationale" in reasons[6]
    ds = build(path, templates=["step_by_step"], val_fraction=0.0)
    assert ds._examples["train"]["is_program"].tolist() == [0.0, 0.0, 1.0]
    # the program-of-thought row uses the program template
    text = ds.tokenizer.decode(ds._examples["train"]["input_ids"][2].tolist())
    assert text.startswith("Question: c\nProgram: (48 / 2) + 48\nAnswer: 72\n")
    assert all(c["ok"] for c in ds.answer_checks())


def test_records_too_long_are_rejected_not_truncated():
    ds = build(GSM8K_SLICE, "gsm8k", seq_len=200, max_records=50)
    assert ds.rejected, "some GSM8K records need more than 200 tokens"
    assert all("seq_len is 200" in r["reason"] for r in ds.rejected)
    assert len(ds.records) + len(ds.rejected) == 50
    assert all(c["ok"] for c in ds.answer_checks())


def test_task_rows_of_a_record_stay_adjacent_in_batches(arithmetic):
    ds = build(arithmetic["train"], templates=["predict", "explain"], val_fraction=0.1)
    assert ds.num_examples("train") == 2 * len(ds.record_splits["train"])
    seen = set()
    for index in range(6):
        batch = ds.batch(index, 8)
        assert batch["task"].tolist() == [0, 1] * 4
        rows = batch["example_index"]
        assert (rows[1::2] == rows[0::2] + 1).all()
        assert (rows[0::2] % 2 == 0).all()
        seen.update((rows[0::2] // 2).tolist())
        again = ds.batch(index, 8)  # a pure function of (seed, index)
        np.testing.assert_array_equal(again["input_ids"], batch["input_ids"])
    assert len(seen) == 24  # 6 batches x 4 records, all distinct within the first epoch
    # the first epoch draws every record once before any repeats
    n = len(ds.record_splits["train"])
    firsts = np.concatenate([ds.batch(i, 8)["example_index"][0::2] // 2 for i in range(n // 4)])
    assert sorted(firsts.tolist()) == list(range(n))


def test_template_errors():
    with pytest.raises(TemplateError, match="unknown template"):
        get_template("chatty")
    with pytest.raises(TemplateError, match="unknown field"):
        get_template("Q: {question} {reasoning} {answer}")
    with pytest.raises(TemplateError, match="needs"):
        get_template("Q: {question}")
    with pytest.raises(TemplateError, match="first"):
        get_template("{answer} {question}")
    with pytest.raises(Exception, match="templates"):
        make_config("dataset", "rationale", path="x", templates=["{question} {bogus}"])


def test_parse_completion_inverts_render():
    from kd_cot.records import RationaleRecord, Step

    record = RationaleRecord("q?", (Step("a = 1", "what is a?"), Step("b = 2")), "3,000", 1)
    for name, template in NAMED.items():
        if not template.has_answer:
            continue
        completion = template.render(record)[len(template.prompt(record.question)) :]
        parsed = template.parse_completion(completion + "trailing junk")
        assert parsed is not None, name
        assert parsed["answer"] == "3,000"
        if template.has_rationale and name != "program":
            texts = [s.text for s in parsed["steps"]]
            assert texts == ["a = 1", "b = 2"], name
    assert NAMED["step_by_step"].parse_completion("a = 1\nThe answer is") is None  # cut short


def test_is_a_core_dataset():
    assert issubclass(RationaleDataset, Dataset)


def test_numbers_with_thousands_of_digits_are_refused_records(tmp_path):
    """Once a bare ValueError (Python's 4,300-digit limit) that aborted the whole load, in
    read_records (program answers) and in kd data inspect (annotations)."""
    huge = "9" * 5000
    path = tmp_path / "huge.jsonl"
    rows = [
        {"question": "fine", "answer": "a <<2*3=6>>6\n#### 6"},
        {"question": "annotation", "answer": f"a <<1+1={huge}>>2\n#### 2"},
        {"question": "gsm8k answer", "answer": f"a\n#### {huge}"},
        {"question": "program answer", "program": "1 + 1", "answer": huge},
        {"question": "hostile program", "program": "(((1e-300)**64)**64)**64", "answer": "0"},
        {"question": "hostile annotation", "answer": "a <<(((1e-300)**64)**64)**64=0>>0\n#### 0"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, rejected, read = read_records(path)
    assert read == 6 and [r.line for r in records] == [1, 6]
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert sorted(reasons) == [2, 3, 4, 5]
    assert all("5000 digits" in reasons[line] for line in (2, 3, 4)), reasons
    assert "bits" in reasons[5]
    ds = build(path, val_fraction=0.0)
    report = ds.inspect()  # the hostile annotation is counted unsafe, quickly
    assert report["records_parsed"] == 2 and report["records_rejected"] == 4
    assert report["calculator_annotations"] == {"checked": 2, "correct": 1, "wrong": 0, "unsafe": 1}
