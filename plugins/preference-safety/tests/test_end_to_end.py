"""Tiny runs through the engine: distil with every preference loss, DPO, and `kd eval --pairs`."""

from __future__ import annotations

import json
import math

import pytest

from kdcore import app, testing

PAIRS = [
    {
        "prompt": f"Q{i}: is {i} even?\nA:",
        "chosen": " yes" if i % 2 == 0 else " no",
        "rejected": " no" if i % 2 == 0 else " yes",
        "safety": "parity" if i % 3 == 0 else False,
    }
    for i in range(10)
]


def spec(data, teacher, losses, steps=4, **train):
    return {
        "run": {"name": "pref-tiny", "seed": 0},
        "data": {
            "name": "pairs",
            "params": {"path": str(data), "seq_len": 24, "val_fraction": 0.2},
        },
        "teachers": [{"path": str(teacher)}],
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 16, "layers": 1, "heads": 2, "max_seq_len": 32},
            }
        },
        "losses": losses,
        "train": {
            "steps": steps,
            "batch_size": 2,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 3e-3},
            **train,
        },
        "eval": {"batches": 1},
    }


@pytest.fixture
def pairs_file(tmp_path, cases):
    return cases["write"](tmp_path / "pairs.jsonl", PAIRS + ["{broken"])


def test_distill_with_every_preference_loss_then_kd_eval(
    tmp_path, pairs_file, random_model_dir, capsys
):
    losses = [
        {"name": "preference_kd", "params": {"temperature": 2.0}},
        {"name": "ranking_preservation", "weight": 5.0},
        {"name": "dpkd", "weight": 0.5, "params": {"beta": 2.0}},
        {"name": "safety_alignment", "weight": 2.0},
    ]
    out = tmp_path / "run"
    summary = app.distill(
        app.load_spec(spec(pairs_file, random_model_dir, losses)), output=out, progress=False
    )
    assert summary["steps"] == 4
    for key in ("preference_kd", "ranking_preservation", "dpkd", "safety_alignment"):
        assert math.isfinite(summary["final_losses"][key])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "ranking_preservation/agreement" in records[0]
    assert testing.run_kd("eval", out, "--pairs", pairs_file, "--json", "--batches", 1) == 0
    report = json.loads(capsys.readouterr().out)["preference"]
    assert report["pairs"] == 10 and report["rejected_lines"] == 1
    assert report["rejected"][0]["line"] == 11
    assert report["safety_pairs"] == 4  # i = 0, 3, 6, 9
    assert 0 <= report["agreement"] <= 1 and report["agreeing_pairs"] == round(
        report["agreement"] * 10
    )
    assert -1 <= report["kendall_tau"] <= 1 and -1 <= report["spearman_rho"] <= 1
    # both models were scored, and the counts fit together: a pair where exactly one model
    # prefers the chosen response is a pair where their margins disagree in sign
    n, disagree = report["pairs"], report["pairs"] - report["agreeing_pairs"]
    for model in ("teacher", "student"):
        assert 0 <= report[f"{model}_correct"] <= n
        assert report[f"{model}_accuracy"] == pytest.approx(report[f"{model}_correct"] / n)
    gap = report["teacher_correct"] - report["student_correct"]
    assert abs(gap) <= disagree and (gap - disagree) % 2 == 0


def test_dpo_training_makes_the_policy_prefer_chosen(tmp_path, pairs_file, random_model_dir):
    out = tmp_path / "dpo"
    run = spec(pairs_file, random_model_dir, [{"name": "dpo", "params": {"beta": 0.5}}], steps=30)
    run["student"]["init"] = {"name": "from-teacher"}
    run["student"]["model"]["params"].update(max_seq_len=64)
    run["train"]["optimizer"]["lr"] = 3e-3
    app.distill(app.load_spec(run), output=out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/dpo" in r]
    # from-teacher init: the policy starts as the reference, so the first loss is log 2
    assert steps[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)
    last = steps[-5:]
    assert sum(r["loss/dpo"] for r in last) / 5 < 0.5 * math.log(2)
    assert sum(r["dpo/reward_accuracy"] for r in last) / 5 > 0.8
