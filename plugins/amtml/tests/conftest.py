"""Fixtures: tiny domain corpora and two tiny teachers trained by the project itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KD_HYPOTHESIS_PROFILE", "fast")

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "examples" / "multi_teacher" / "data"


@pytest.fixture(scope="session")
def domains(tmp_path_factory) -> dict[str, Path]:
    """Two small domain files: Shakespeare and GSM8K (the experiment's bundled slices)."""
    folder = tmp_path_factory.mktemp("domains")
    out = {}
    for name in ("shakespeare", "gsm8k"):
        path = folder / f"{name}.txt"
        path.write_text((DATA / f"{name}.txt").read_text(encoding="utf-8")[:12_000])
        out[name] = path
    return out


def teacher_spec(path: Path, dim: int, steps: int = 6) -> dict:
    return {
        "run": {"name": f"teacher-{path.stem}", "seed": 0},
        "data": {"name": "text", "params": {"path": str(path), "seq_len": 32}},
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": dim, "layers": 2, "heads": 2, "max_seq_len": 32},
            }
        },
        "losses": [{"name": "ce"}],
        "train": {
            "steps": steps,
            "batch_size": 4,
            "log_every": 3,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 1},
    }


@pytest.fixture(scope="session")
def teachers(tmp_path_factory, domains) -> dict[str, Path]:
    """Two tiny teachers of different widths, one per domain."""
    import kdcore

    out = {}
    for (name, path), dim in zip(domains.items(), (32, 24)):
        run = tmp_path_factory.mktemp(f"teacher-{name}")
        kdcore.distill(kdcore.load_spec(teacher_spec(path, dim)), output=run, progress=False)
        out[name] = run / "student"
    return out
