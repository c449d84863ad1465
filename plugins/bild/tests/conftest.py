"""A tiny corpus and a tiny teacher trained with the project, shared by the bild tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import kdcore

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"


def tiny_spec(corpus: Path, losses, steps: int = 20, dim: int = 32, teachers=None) -> dict:
    spec = {
        "run": {"name": "tiny", "seed": 0},
        "data": {
            "name": "text",
            "params": {"path": str(corpus), "seq_len": 32, "val_fraction": 0.1},
        },
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": dim, "layers": 2, "heads": 2, "max_seq_len": 32},
            }
        },
        "losses": losses,
        "train": {
            "steps": steps,
            "batch_size": 4,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 2},
    }
    if teachers is not None:
        spec["teachers"] = teachers
    return spec


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("teacher-run")
    kdcore.distill(
        tiny_spec(corpus, [{"name": "ce"}], steps=40, dim=48), output=out, progress=False
    )
    return out / "student"


@pytest.fixture
def spec_for(corpus):
    def make(losses, **kw):
        return tiny_spec(corpus, losses, **kw)

    return make
