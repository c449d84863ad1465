"""Shared fixtures: a tiny corpus, a tiny saved teacher, and spec builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"

os.environ.setdefault("KD_HYPOTHESIS_PROFILE", "fast")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 40k characters of the bundled corpus."""
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def tiny_spec(corpus: Path, **sections) -> dict:
    spec = {
        "run": {"name": "tiny", "seed": 0},
        "data": {
            "name": "text",
            "params": {"path": str(corpus), "seq_len": 32, "val_fraction": 0.1},
        },
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 32, "layers": 2, "heads": 2, "max_seq_len": 32},
            }
        },
        "losses": [{"name": "ce"}],
        "train": {
            "steps": 6,
            "batch_size": 4,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 2},
    }
    for key, value in sections.items():
        spec[key] = value
    return spec


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, corpus) -> Path:
    """A small teacher trained for a few steps with the project itself."""
    import kdcore

    out = tmp_path_factory.mktemp("teacher-run")
    spec = tiny_spec(corpus)
    spec["student"]["model"]["params"].update(dim=48, layers=2, heads=4)
    spec["train"]["steps"] = 30
    spec["train"]["log_every"] = 10
    kdcore.distill(kdcore.load_spec(spec), output=out, progress=False)
    return out / "student"


@pytest.fixture
def make_spec(corpus):
    def make(**sections):
        return tiny_spec(corpus, **sections)

    return make
