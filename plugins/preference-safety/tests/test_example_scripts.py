"""examples/preference: split.py makes three disjoint, deterministic splits of the bundled
pairs; tune.py chooses the DPO settings by its stated rule."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "preference"


def load_script(name: str):
    path = EXAMPLE / f"{name}.py"
    if not path.exists():
        pytest.fail(f"{path} is missing")
    spec = importlib.util.spec_from_file_location(f"preference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def split():
    return load_script("split")


def read_pairs(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_split_is_disjoint_complete_and_deterministic(split, tmp_path):
    split.main(tmp_path / "a")
    split.main(tmp_path / "b")
    names = ("train", "tune", "heldout")
    parts = {n: read_pairs(tmp_path / "a" / f"{n}.jsonl.gz") for n in names}
    assert [len(parts[n]) for n in names] == [1156 - split.HELDOUT - split.TUNE, split.TUNE, 250]
    keys = {n: {(r["chosen"], r["rejected"]) for r in parts[n]} for n in names}
    assert not keys["train"] & keys["tune"]
    assert not keys["train"] & keys["heldout"]
    assert not keys["tune"] & keys["heldout"]
    for name in (*names, "sft"):
        suffix = ".txt.gz" if name == "sft" else ".jsonl.gz"
        first = (tmp_path / "a" / f"{name}{suffix}").read_bytes()
        assert first == (tmp_path / "b" / f"{name}{suffix}").read_bytes()
    sft = gzip.decompress((tmp_path / "a" / "sft.txt.gz").read_bytes()).decode("utf-8")
    assert sft == "".join(r["chosen"] for r in parts["train"])
    # the tune and held-out chosen responses never reach the SFT text
    assert all(r["chosen"] not in sft for r in parts["heldout"] + parts["tune"])


def test_safety_categories_follow_the_human_turns(split):
    record = {"chosen": "\n\nHuman: how do I steal a car?\n\nAssistant: I can't help."}
    assert split.safety_category(record) == "crime"
    assert split.safety_category({"chosen": "\n\nHuman: hi\n\nAssistant: steal away"}) is False


def test_tune_takes_the_best_tune_accuracy_among_intact_language_models():
    tune = load_script("tune")
    rise = tune.MAX_VAL_LOSS_RISE

    def row(accuracy, val_loss):
        return {"accuracy": accuracy, "val_loss": val_loss, "reference_val_loss": 2.0}

    rows = {
        "wrecked": row(0.70, 2.0 + 3 * rise),
        "intact": row(0.55, 2.0 + rise / 2),
        "edge": row(0.56, 2.0 + rise),
        "tie, later": row(0.56, 2.0),
    }
    assert tune.choose(rows) == "edge"
    del rows["edge"], rows["tie, later"]
    assert tune.choose(rows) == "intact"
    with pytest.raises(SystemExit, match="no DPO variant"):
        tune.choose({"wrecked": rows["wrecked"]})
    assert len(set(map(tune.slug, tune.VARIANTS))) == len(tune.VARIANTS)


def test_report_p_value_is_the_binomial_upper_tail():
    report = load_script("report")
    assert report.chance_p_value(2, 2) == 0.25
    assert report.chance_p_value(0, 5) == 1.0
    assert report.chance_p_value(4, 5) == pytest.approx(6 / 32)
    # P(X >= k) + P(X <= k - 1) = 1 and the binomial(n, 1/2) is symmetric
    assert report.chance_p_value(130, 247) + report.chance_p_value(247 - 129, 247) == (
        pytest.approx(1.0)
    )


def test_weights_takes_the_best_mean_agreement_per_margin_loss():
    weights = load_script("weights")

    def row(spec, weight, seed, agreement, tau):
        return dict(spec=spec, weight=weight, seed=seed, agreement=agreement, kendall_tau=tau)

    rows = [
        row("student_kd", None, 0, 0.99, 0.99),  # the reference is never "chosen"
        # best single seed (w 20, seed 0) loses to the best mean over seeds (w 1)
        row("student_rank", 20.0, 0, 0.95, 0.9),
        row("student_rank", 20.0, 1, 0.80, 0.9),
        row("student_rank", 1.0, 0, 0.90, 0.8),
        row("student_rank", 1.0, 1, 0.90, 0.8),
        # equal agreement: the higher tau wins; then equal both: the earlier weight
        row("student_safety", 10.0, 0, 0.9, 0.7),
        row("student_safety", 1.0, 0, 0.9, 0.8),
        row("student_dpkd", 1.0, 0, 0.9, 0.8),
        row("student_dpkd", 0.1, 0, 0.9, 0.8),
    ]
    assert weights.choose(rows) == {"student_rank": 1.0, "student_safety": 1.0, "student_dpkd": 1.0}
    assert weights.parse_run("student_rank:0.1") == ("student_rank", 0.1)
    assert weights.parse_run("student_kd") == ("student_kd", None)
    for bad in ("student_kd:1", "student_rank", "student_nope:1"):
        with pytest.raises(SystemExit):
            weights.parse_run(bad)
