"""Through the public doors: kd data inspect, kd distill with the cot / step_by_step losses,
kd generate and kd cot-eval, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

from kd_cot.synthetic import write_jsonl

from kdcore import app, testing

SLICE = Path(__file__).parent / "data" / "gsm8k_slice.jsonl"
COT = "Q:{question}\n{rationale}\nA:{answer}\n"
MODEL = {"name": "transformer", "params": {"dim": 32, "layers": 1, "heads": 2, "max_seq_len": 64}}
# Big enough to learn four problems by heart on any CPU (CE ~1e-4 for seeds 0-3): the
# one-layer student size at lr 1e-2 recited 0-4 of them depending on seed and machine.
TEACHER = {"name": "transformer", "params": {"dim": 64, "layers": 2, "heads": 4, "max_seq_len": 64}}
RECORDS = [
    {"question": "12+34", "rationale": ["2+4+0=6", "1+3+0=4"], "answer": "46"},
    {"question": "57+68", "rationale": ["7+8+0=15", "5+6+1=12"], "answer": "125"},
    {"question": "23*4", "rationale": ["3*4+0=12", "2*4+1=9"], "answer": "92"},
    {"question": "61*7", "rationale": ["1*7+0=7", "6*7+0=42"], "answer": "427"},
]


def test_kd_data_inspect_gsm8k_json(capsys):
    assert testing.run_kd("data", "inspect", SLICE, "--format", "gsm8k", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records_read"] == 300
    assert report["records_parsed"] == 300 and report["rejected"] == []
    assert len(report["records"]) == 300
    assert all(r["answer_mask_ok"] for r in report["records"])
    assert report["answer_mask"]["decode_to_answer"] == 300
    assert report["samples"][0]["answer_text"] == "72"


def test_kd_data_inspect_text_reports_rejected_lines(tmp_path, capsys):
    path = tmp_path / "g.jsonl"
    good = SLICE.read_text().splitlines()[:2]
    path.write_text("\n".join([good[0], '{"question": "q", "answer": "no hash"}', good[1]]) + "\n")
    assert testing.run_kd("data", "inspect", path, "--format", "gsm8k") == 0
    out = capsys.readouterr().out
    assert "records_parsed: 2" in out
    assert "line 2: no '#### answer' line" in out
    assert "2 records, 2 answer masks decode to the answer" in out


def _spec(
    data: dict,
    losses: list,
    out: Path,
    steps: int,
    teacher: Path | None = None,
    lr=3e-3,
    model: dict = MODEL,
):
    spec = {
        "run": {"name": out.name, "seed": 0},
        "data": {
            "name": "rationale",
            "params": {"tokenizer": "byte", "val_fraction": 0.25, **data},
        },
        "student": {"model": model},
        "losses": losses,
        "train": {"steps": steps, "batch_size": 8, "log_every": 1, "optimizer": {"lr": lr}},
        "eval": {"batches": 1},
    }
    if teacher is not None:
        spec["teachers"] = [{"path": str(teacher)}]
    return spec


def test_teacher_generate_and_students(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, RECORDS * 4)  # the val split (a quarter) holds copies too
    # A teacher that learns four problems by heart, so its samples can be checked.
    teacher = app.distill(
        _spec(
            {"path": str(train), "templates": [COT]},
            [{"name": "ce"}],
            tmp_path / "t",
            200,
            lr=3e-3,
            model=TEACHER,
        ),
        output=tmp_path / "t",
        progress=False,
    )
    assert teacher["final_losses"]["ce"] < 0.01
    teacher_dir = tmp_path / "t" / "student"

    questions = tmp_path / "questions.jsonl"
    write_jsonl(questions, RECORDS)
    (tmp_path / "gen.toml").write_text(
        f'teacher = "{teacher_dir}"\ninput = "{questions}"\noutput = "gen.jsonl"\n'
        f'template = "Q:{{question}}\\n{{rationale}}\\nA:{{answer}}\\n"\n'
        "[sampling]\nn = 3\ntemperature = 0.0\nmax_new_tokens = 32\nchunk = 8\n"
        '[filters]\nagreement = "reference"\nmax_steps = 4\n'
    )
    assert testing.run_kd("generate", tmp_path / "gen.toml", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 12
    assert summary["kept"] + sum(summary["dropped"].values()) == 12
    # greedy samples are identical: one kept per question, the others are duplicates
    assert summary["kept"] == 4 and summary["dropped"] == {"duplicate": 8}
    assert summary["kept_matching_reference"] == 1.0
    kept = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [k["answer"] for k in kept] == [r["answer"] for r in RECORDS]
    assert [k["rationale"] for k in kept] == [r["rationale"] for r in RECORDS]
    on_disk = json.loads((tmp_path / "gen.summary.json").read_text())
    assert on_disk["kept"] == 4 and on_disk["dropped"] == {"duplicate": 8}

    assert testing.run_kd("cot-eval", teacher_dir, questions, "--template", COT, "--json") == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0

    generated = tmp_path / "gen.jsonl"
    cot = app.distill(
        _spec(
            {"path": str(generated), "templates": [COT]},
            [{"name": "cot", "params": {"temperature": 2.0, "answer_weight": 2.0}}],
            tmp_path / "c",
            4,
            teacher=teacher_dir,
        ),
        output=tmp_path / "c",
        progress=False,
    )
    assert set(cot["final_losses"]) == {"cot"}
    logged = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 4
    assert all(r["cot/kl_answer"] > 0 and r["cot/kl_reasoning"] > 0 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]

    sbs = app.distill(
        _spec(
            {"path": str(generated), "templates": ["predict", "explain"]},
            [{"name": "step_by_step", "params": {"alpha": 0.5}}],
            tmp_path / "s",
            4,
        ),
        output=tmp_path / "s",
        progress=False,
    )
    logged = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    # both task rows of every record are in every batch
    assert all(r["step_by_step/ce_predict"] > 0 and r["step_by_step/ce_explain"] > 0 for r in steps)
    assert sbs["steps"] == 4
