"""A tiny two-teacher AMTML run through the engine, and the heatmap command on it."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import kdcore
from kdcore import app, testing
from kdcore.app import Transformer, TransformerConfig, load_arrays


def _trainable(run: Path, step: int) -> dict:
    """The trainable arrays (student, aggregator, loss modules) of checkpoint ``step``."""
    path = run / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors"
    return load_arrays(path, "checkpoint")


@pytest.fixture(scope="module")
def amtml_run(tmp_path_factory, domains, teachers):
    spec = {
        "run": {"name": "amtml-tiny", "seed": 0},
        "data": {
            "name": "mixture",
            "params": {
                "paths": [str(domains["shakespeare"]), str(domains["gsm8k"])],
                "names": ["shakespeare", "gsm8k"],
                "seq_len": 32,
                "val_fraction": 0.1,
            },
        },
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 16, "layers": 2, "heads": 2, "max_seq_len": 32},
            }
        },
        "teachers": [
            {"path": str(teachers["shakespeare"]), "label": "shakespeare"},
            {"path": str(teachers["gsm8k"]), "label": "gsm8k"},
        ],
        "aggregator": {"name": "amtml", "params": {"latent_dim": 8}},
        "losses": [
            {"name": "amtml", "weight": 0.7, "params": {"temperature": 2.0}},
            {"name": "ce", "weight": 0.3},
            {
                "name": "hint",
                "weight": 0.5,
                "params": {"strategy": "groups", "instance_weighted": True},
            },
        ],
        "train": {
            "batch_size": 4,
            "log_every": 1,
            "keep_checkpoints": 2,
            "optimizer": {"name": "adamw", "lr": 1e-2},
            # The paper's two phases: aggregator and student together, then the
            # aggregator frozen.
            "stages": [
                {"steps": 3, "name": "joint"},
                {
                    "steps": 3,
                    "name": "frozen",
                    "param_groups": [{"pattern": "^aggregator\\.", "lr_mult": 0.0}],
                },
            ],
        },
        "eval": {"batches": 2},
    }
    out = tmp_path_factory.mktemp("amtml-run")
    summary = app.distill(app.load_spec(spec), output=out, progress=False)
    return out, summary


def test_instance_weights_and_regulariser_are_logged(amtml_run):
    out, summary = amtml_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "eval" not in r]
    assert len(train) == 6
    for r in train:
        assert r["teacher_weight/0"] + r["teacher_weight/1"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < r["teacher_weight/0"] < 1.0
        assert r["amtml/regularizer"] > 0 and r["loss/hint"] > 0
    assert np.isfinite(summary["eval"]["val_loss"])


def test_saved_student_holds_no_projection_or_aggregator_weights(amtml_run):
    out, summary = amtml_run
    saved = load_arrays(out / "student" / "model.safetensors", "student")
    fresh = Transformer(
        TransformerConfig(vocab_size=256, dim=16, layers=2, heads=2, max_seq_len=32)
    )
    assert set(saved) == {k for k, _ in tree_flatten(fresh.parameters())}
    # ... while the run did train more than the student: the aggregator and projections.
    student_size = sum(v.size for v in saved.values())
    assert summary["trainable_parameters"] > student_size


def test_frozen_stage_keeps_the_aggregator_fixed(amtml_run, teachers):
    out, _ = amtml_run
    first = _trainable(out, 3)
    second = _trainable(out, 6)
    agg_keys = [k for k in first if k.startswith("aggregator.")]
    assert {"aggregator.theta", "aggregator.w", "aggregator.encoder.weight"} <= set(agg_keys)
    for key in agg_keys:
        assert np.array_equal(np.array(first[key]), np.array(second[key])), key
    moved = [
        k
        for k in first
        if k.startswith("student.") and not np.array_equal(np.array(first[k]), np.array(second[k]))
    ]
    assert moved, "the student should keep training in the frozen stage"
    # The joint stage did train the aggregator (theta differs from its seeded start).
    start = app.build(
        "teacher_aggregator", "amtml", kdcore.Setup(num_teachers=2), latent_dim=8, input_dim=16
    )
    assert not np.allclose(np.array(start.theta), np.array(first["aggregator.theta"]))
    # Hint projections are checkpointed with the run (they live in the loss module).
    assert any(k.startswith("losses.loss2.proj.") for k in first)


def test_heatmap_command(amtml_run):
    out, _ = amtml_run
    assert testing.run_kd("amtml-heatmap", out, "--json") == 0
    data = json.loads((out / "report" / "amtml_weights.json").read_text())
    assert (out / "report" / "amtml_weights.png").stat().st_size > 1000
    assert data["teachers"] == ["shakespeare", "gsm8k"]
    assert data["domains"] == ["shakespeare", "gsm8k"]
    assert data["teacher_domain"] == [0, 1]
    assert 0.0 <= data["routing_accuracy"] <= 1.0
    matrix = np.array(data["matrix"])
    assert matrix.shape == (2, 2) and np.allclose(matrix.sum(1), 1.0, atol=1e-5)
    assert sum(data["examples"].values()) > 0
    mx.clear_cache()


def test_report_includes_the_heatmap(amtml_run):
    out, _ = amtml_run
    png = out / "report" / "amtml_weights.png"
    png.unlink(missing_ok=True)  # made by the report, not left over from the command's test
    with testing.plugins():  # the installed plugins only
        text = app.write_report(out).read_text()
    assert "## AMTML instance weights" in text
    assert "![amtml instance weights](report/amtml_weights.png)" in text
    assert png.stat().st_size > 1000
    data = json.loads(png.with_suffix(".json").read_text())
    assert f"- routing accuracy: {data['routing_accuracy']:.3f}" in text
    assert "| domain | examples | shakespeare | gsm8k |" in text
    assert "report section failed" not in text
    mx.clear_cache()


def test_report_of_a_run_without_amtml_has_no_heatmap_section(tmp_path):
    from kd_amtml.heatmap import report_section

    (tmp_path / "spec.toml").write_text('[aggregator]\nname = "mean"\n')
    (tmp_path / "run.json").write_text("{}")
    assert report_section(tmp_path, tmp_path / "report") is None
    assert report_section(tmp_path / "missing", tmp_path / "report") is None
